"""docs/algorithms.md's online-algorithm example (an advantage estimator declared by a plugin class) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from rlhf_algos import OnlineAlgorithm
from rlhf_algos.testing import FirstTokenReward, ScriptedPolicy
from torch.testing import assert_close

DOC = Path(__file__).resolve().parents[1] / "docs" / "algorithms.md"
V, PAD, EOS = 10, 0, 1


def test_the_median_baseline_example_computes_its_advantages_by_hand() -> None:
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if "class MedianBaseline" in c]
    ns: dict = {}
    exec(code, ns)
    cls = ns["MedianBaseline"]
    assert issubclass(cls, OnlineAlgorithm)
    # 2 prompts x 3 samples; FirstTokenReward(4) scores the groups [1, 1, 0] and [0, 0, 1]; the medians are 1
    # and 0, so the sequence advantages are [0, 0, -1] and [0, 0, 1]. The reference is the actor (KL = 0),
    # gamma 1: every valid token gets its row's advantage.
    actor = ScriptedPolicy(V, [[4, EOS], [4, EOS], [3, EOS], [3, EOS], [3, EOS], [4, EOS]])
    algo = cls(ns["RLOOConfig"](samples_per_prompt=3, max_new_tokens=2), actor=actor, reference=actor.frozen_copy(),
               reward_fn=FirstTokenReward(4), eos_token_id=EOS, pad_token_id=PAD)
    prompts = torch.tensor([[5, 6], [7, 8]])
    exp = algo.generate_experience(prompts, torch.ones_like(prompts))
    assert_close(exp.scores, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0]))
    assert_close(exp.advantages, torch.tensor([0.0, 0.0, -1.0, 0.0, 0.0, 1.0])[:, None].expand(6, 2))
