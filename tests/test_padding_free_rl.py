"""The padding-free RL learn step (``OnlineConfig.batch_layout``) gives the padded step's losses and gradients.

One ragged rollout micro-batch, built here as the rollout lays it out (left-padded prompts of 1-6 tokens,
responses of 1-7 tokens ending in EOS, right-padded after it), goes through ``train_step`` of PPO (actor and
critic) and GRPO (actor, k3 KL in the loss) on copies of one tiny fp32 Llama (GQA) and its value model:

* ``packed``: ``batch_layout="rows"`` / ``"one_row"``: each row's real tokens packed
  (``rlhf_data.pack_padded_batch``), the HybridEngine's packed forward, outputs scattered back;
* ``padded``: ``batch_layout="padded"``, the rollout rows as they are (the reference for the losses and
  every gradient);
* ``alone``: written here, each sequence's real tokens run alone through the plain transformers model
  (no padding, no packing, no mask): the log-probs and entropies at the sampling temperature by hand
  (log_softmax(logits / T)), and the critic's values (the reference for the forwards themselves).

Tolerance (fp32, CPU): max abs difference <= 1e-5 for the forwards, the losses and every parameter
gradient (they differ by summation order only). Packed positions that do not restart let attention
cross sequences; the negative control checks that this is caught.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from torch import nn

PAD, EOS, TOL, TEMP = 0, 1, 1e-5, 0.8
# (prompt tokens, response tokens incl. EOS) per row; P = 6, R = 7. Real lengths 13, 5, 9, 2, 11: "rows" packs
# them first fit into rows of 13 as [13] [5, 2] [9] [11]; "one_row" as one row of 40.
SHAPES = [(6, 7), (2, 3), (4, 5), (1, 1), (5, 6)]
P, R = 6, 7
PACKED_SHAPES = {"rows": (4, 13), "one_row": (1, 40)}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from rlhf_hybrid.testing import world_of_one

    with world_of_one():
        yield


def _actor(attn: str) -> nn.Module:
    from rlhf_hybrid.testing import tiny_family

    torch.manual_seed(0)
    model = tiny_family("llama")
    model.set_attn_implementation(attn)
    return model.float()


def _critic(attn: str) -> nn.Module:
    from rlhf_hybrid import ValueModel

    vm = ValueModel(_actor(attn))
    torch.manual_seed(5)
    nn.init.normal_(vm.head.weight, std=0.5)  # a fresh head is all zero: the backbone would get no gradient
    return vm


def _experience(vocab: int):
    """The micro-batch: sequences and masks as ``generate_responses`` builds them, old log-probs, values,
    advantages and returns drawn at random (0 on padding, as the rollout leaves them)."""
    from rlhf_algos import Experience

    g = torch.Generator().manual_seed(7)
    n = len(SHAPES)
    seqs = torch.full((n, P + R), PAD)
    prompt_mask, resp_mask = torch.zeros((n, P), dtype=torch.long), torch.zeros((n, R))
    for i, (p, r) in enumerate(SHAPES):
        seqs[i, P - p : P] = torch.randint(2, vocab, (p,), generator=g)
        seqs[i, P : P + r - 1] = torch.randint(2, vocab, (r - 1,), generator=g)
        seqs[i, P + r - 1] = EOS
        prompt_mask[i, P - p :] = 1
        resp_mask[i, :r] = 1
    attn = torch.cat([prompt_mask, resp_mask.long()], dim=1)

    def drawn(scale: float, shift: float = 0.0) -> torch.Tensor:
        return (shift + scale * torch.randn((n, R), generator=g)) * resp_mask

    return Experience(prompt_ids=seqs[:, :P], prompt_mask=prompt_mask, meta=[{}] * n, sequences=seqs,
                      attention_mask=attn, prompt_len=P, response_mask=resp_mask, logprobs=drawn(0.5, -4.5),
                      ref_logprobs=drawn(0.5, -4.5), values=drawn(0.3), scores=torch.zeros(n),
                      train_scores=torch.zeros(n), advantages=drawn(1.0), returns=drawn(1.0))


def _alone(actor: nn.Module, critic: nn.Module, exp) -> dict[str, list[torch.Tensor]]:
    """Per sequence, its real tokens alone through the plain models: the response tokens' log-probs and
    entropies at ``TEMP`` and the critic's V(s_t) before each response token."""
    out: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": [], "values": []}
    with torch.no_grad():
        for i, (p, r) in enumerate(SHAPES):
            ids = exp.sequences[i, P - p : P + r][None]  # (1, p + r)
            logp = torch.log_softmax(actor(input_ids=ids).logits[0, :-1].float() / TEMP, -1)  # predicts 1..p+r-1
            out["logprobs"].append(logp.gather(1, ids[0, 1:, None]).squeeze(1)[p - 1 :])  # (r,)
            out["entropy"].append(-(logp.exp() * logp).sum(-1)[p - 1 :])
            out["values"].append(critic(ids, torch.ones_like(ids))[0, p - 1 : -1])  # V before each of the r tokens
    return out


class _Seen:
    """Records the ``input_ids`` shape of every forward, then forwards to ``inner`` (a GradOnly)."""

    def __init__(self, inner) -> None:
        self.inner, self.engine, self.shapes = inner, inner.engine, []

    def token_logprobs(self, input_ids, *a, **kw):
        self.shapes.append(tuple(input_ids.shape))
        return self.inner.token_logprobs(input_ids, *a, **kw)

    def values(self, input_ids, *a, **kw):
        self.shapes.append(tuple(input_ids.shape))
        return self.inner.values(input_ids, *a, **kw)

    def __getattr__(self, name):  # backward, step, train, eval
        return getattr(self.inner, name)


def _algorithm(name: str, layout: str, actor, critic):
    from rlhf_algos import GRPO, PPO, GRPOConfig, PPOConfig

    if name == "ppo":
        cfg = PPOConfig(batch_layout=layout, temperature=TEMP, micro_batch_size=len(SHAPES), clip_eps=0.2)
        return PPO(cfg, actor=actor, reference=actor, critic=critic, reward_fn=None, eos_token_id=EOS,
                   pad_token_id=PAD)
    cfg = GRPOConfig(batch_layout=layout, temperature=TEMP, micro_batch_size=len(SHAPES),
                     loss_agg="seq-mean-token-mean")
    return GRPO(cfg, actor=actor, reference=actor, reward_fn=None, eos_token_id=EOS, pad_token_id=PAD)


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _check_forwards(algo, exp, want: dict, with_critic: bool, what: str) -> None:
    """The learn step's forwards (padded layout, 0 on padding) against each sequence run alone."""
    with torch.no_grad():
        got = dict(zip(("logprobs", "entropy"), algo.learn_logprobs(exp), strict=True))
        if with_critic:
            got["values"] = algo.learn_values(exp)
    for key, value in got.items():
        for i, (_, r) in enumerate(SHAPES):
            worst = (value[i, :r].float() - want[key][i]).abs().max().item()
            assert worst <= TOL, f"{what}: {key} of row {i} differs from the sequence alone by {worst:.3g}"


@pytest.mark.parametrize(("name", "layout", "attn"), [
    ("ppo", "rows", "sdpa"), ("ppo", "one_row", "sdpa"), ("ppo", "rows", "eager"),
    ("grpo", "rows", "sdpa"), ("grpo", "one_row", "eager"),
])
def test_learn_step_packed_equals_padded_and_sequences_alone(name: str, layout: str, attn: str) -> None:
    from rlhf_data import pack_padded_batch
    from rlhf_hybrid.testing import grad_only, param_grads

    base_actor, base_critic = _actor(attn), _critic(attn) if name == "ppo" else None
    exp = _experience(base_actor.config.vocab_size)
    assert tuple(pack_padded_batch(exp.sequences, exp.attention_mask, PAD, layout)["input_ids"].shape) == \
        PACKED_SHAPES[layout]
    want = _alone(base_actor, base_critic or _critic(attn), exp)
    got = {}
    for layout_ in (layout, "padded"):
        actor = _Seen(grad_only(copy.deepcopy(base_actor)))
        critic = _Seen(grad_only(copy.deepcopy(base_critic))) if base_critic is not None else None
        algo = _algorithm(name, layout_, actor, critic)
        _check_forwards(algo, exp, want, critic is not None, f"batch_layout={layout_}")
        step = {k: v.item() for k, v in algo.train_step(exp).items()}
        shape = PACKED_SHAPES[layout] if layout_ != "padded" else tuple(exp.sequences.shape)
        for model in (actor, critic) if critic is not None else (actor,):  # the learn step ran on packed rows
            assert model.shapes and set(model.shapes) == {shape}, (layout_, model.shapes)
        grads = {f"actor.{k}": v for k, v in param_grads(actor.engine.module).items()}
        if critic is not None:
            grads |= {f"critic.{k}": v for k, v in param_grads(critic.engine.module).items()}
        got[layout_] = (step, grads)
    (packed, g_packed), (padded, g_padded) = got[layout], got["padded"]
    assert packed.keys() == padded.keys()
    assert {"policy_loss", "entropy", "approx_kl"} <= packed.keys()
    assert ("value_loss" in packed) is (name == "ppo") and ("kl_loss" in packed) is (name == "grpo")
    for k in packed:
        assert abs(packed[k] - padded[k]) <= TOL, (k, packed[k], padded[k])
    assert 0 < packed["clip_frac"] < 1  # the old log-probs are far enough off for the clip to act on some tokens
    assert any(k.startswith("critic.") for k in g_packed) is (name == "ppo")
    worst = _worst(g_packed, g_padded)
    assert worst <= TOL, f"{name} {layout} {attn}: max abs gradient difference {worst:.3g} > {TOL}"


class _PositionsNotRestarting:
    """The actor, fed packed rows whose positions run 0..W-1 (one long sequence per row): attention crosses."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def token_logprobs(self, input_ids, attention_mask, start=1, *, position_ids=None, **kw):
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return self.inner.token_logprobs(input_ids, attention_mask, start, position_ids=position_ids, **kw)


def test_positions_that_do_not_restart_are_caught() -> None:
    """The forward comparison above can fail: with continuous positions every packed sequence after the first
    attends to the ones before it, and its log-probs leave the tolerance by far."""
    from rlhf_hybrid.testing import grad_only

    base = _actor("sdpa")
    exp = _experience(base.config.vocab_size)
    want = _alone(base, _critic("sdpa"), exp)
    algo = _algorithm("grpo", "one_row", _PositionsNotRestarting(grad_only(copy.deepcopy(base))), None)
    with torch.no_grad():
        lp, _ = algo.learn_logprobs(exp)
    assert (lp[0, :R] - want["logprobs"][0]).abs().max().item() <= TOL  # the first sequence sees nothing before it
    worst = max((lp[i, :r] - want["logprobs"][i]).abs().max().item() for i, (_, r) in enumerate(SHAPES) if i)
    assert worst > 100 * TOL


def test_an_empty_prompt_and_non_contiguous_rows_are_refused() -> None:
    from rlhf_algos._padding_free import learn_logprobs
    from rlhf_data import pack_padded_batch

    seqs = torch.tensor([[0, 0, 5, 6], [0, 7, 8, 1]])
    with pytest.raises(ValueError, match=r"row 0 has response tokens but no real token at column 1"):
        learn_logprobs(None, seqs, torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]), 2, layout="rows", pad_id=PAD)
    with pytest.raises(ValueError, match=r"row 1's real tokens \(attention_mask == 1\) are not contiguous"):
        pack_padded_batch(seqs, torch.tensor([[0, 0, 1, 1], [1, 0, 1, 1]]), PAD)


def test_rl_padding_free_config_names_the_field() -> None:
    from rlhf_algos import PPOConfig
    from rlhf_cli.config import load_config
    from rlhf_cli.config_sections import ConfigError

    assert load_config(None, []).algorithm_config().batch_layout == "padded"
    cfg = load_config(None, ["rl.padding_free=true", "algo.name=grpo"])
    assert cfg.algorithm_config().batch_layout == "rows"
    assert cfg.algorithm_config("one_row").batch_layout == "one_row"  # flash attention's layout
    with pytest.raises(ConfigError, match=r"rl.padding_free: true, but algo.name='dpo' has no padding-free"):
        load_config(None, ["rl.padding_free=true", "algo.name=dpo"])
    with pytest.raises(ConfigError, match=r"algo.batch_layout: set rl.padding_free instead"):
        load_config(None, ["algo.batch_layout=rows"])
    with pytest.raises(ValueError, match=r"ppo.batch_layout: 'packed' is not allowed; allowed: 'padded', 'rows', "
                                         r"'one_row'"):
        PPOConfig(batch_layout="packed")
