"""docs/api.md's examples run as written.

* ``sft-rm-ppo``: the whole pipeline from Python (rlhf_algos.SFT -> RM -> PPO on the demo data,
  public API only), run at a tiny size: the example's first line of stage sizes is replaced with 2
  steps of each; nothing else changes (about 25 s on the 2-core CI machine).
* ``grpo-loop``: its own GRPO loop raises the demo's held-out verifier score, like the built-in stage
  does. It needs a demo SFT checkpoint: this test makes one with ``rlhf run --stage sft`` (the default
  demo settings, about two minutes on the CI machine) and runs the example in a directory where
  ``runs/demo/sft`` is that checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def example(name: str) -> str:
    """The python block of docs/api.md whose first line is ``# example: <name>``."""
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
               if c.startswith(f"# example: {name}\n")]
    return code


def _run_example(code: str, cwd: Path, monkeypatch) -> str:
    """Execute ``code`` in ``cwd`` (in a world of one, on the CPU); returns what it printed."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = io.StringIO()
    from rlhf_hybrid.testing import world_of_one

    # the example's own init_distributed() joins this world of one (an earlier test's, if any)
    with world_of_one(), contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_api_example"})
    return out.getvalue()


def test_pipeline_example_runs_sft_rm_ppo_from_python(tmp_path, monkeypatch) -> None:
    code = example("sft-rm-ppo")
    sizes = re.search(r"^SFT_STEPS, RM_STEPS, PPO_ITERATIONS = .*$", code, flags=re.M)
    assert sizes, "the example's stage sizes must stay on one line (this test shrinks them)"
    text = _run_example(code.replace(sizes.group(0), "SFT_STEPS, RM_STEPS, PPO_ITERATIONS = 2, 2, 2"), tmp_path,
                        monkeypatch)
    assert re.search(r"sft: held-out loss [0-9.]+ -> [0-9.]+", text), text
    assert re.search(r"rm: held-out pairwise accuracy [0-9.]+", text), text
    assert re.search(r"ppo: held-out verifier score [0-9.]+ -> [0-9.]+", text), text
    for stage in ("sft", "rm", "ppo"):
        assert (tmp_path / "runs" / "api" / stage / "config.json").is_file(), stage
    rm_config = json.loads((tmp_path / "runs" / "api" / "rm" / "config.json").read_text())
    assert rm_config["architectures"] == ["LlamaForSequenceClassification"] and len(rm_config["id2label"]) == 1


@pytest.mark.slow
def test_api_example_runs_and_improves_the_demo(tmp_path, rlhf, explain, monkeypatch) -> None:
    proc = rlhf(["run", "--stage", "sft", "--out", tmp_path / "runs" / "demo"], timeout=900)
    assert proc.returncode == 0, explain(proc)
    text = _run_example(example("grpo-loop"), tmp_path, monkeypatch)
    m = re.search(r"held-out verifier score: ([0-9.]+) -> ([0-9.]+)", text)
    assert m, text
    before, after = float(m.group(1)), float(m.group(2))
    assert after > before + 0.05, text
    assert (tmp_path / "runs" / "demo" / "my-grpo" / "config.json").is_file()
    assert os.path.isfile(tmp_path / "runs" / "demo" / "my-grpo" / "tokenizer.json")
