"""Padding-free micro-batches (rlhf_data.packing) give the padded path's SFT and RM losses and gradients.

The same ragged micro-batch goes through three paths on copies of one tiny fp32 Llama:

* ``packed``: ``SFT(batch_layout=...)`` / ``RM(batch_layout=...)`` with the layouts ``"rows"`` and
  ``"one_row"``: collate, ``learn`` (the HybridEngine's packed forward: ``attention_mask=None``,
  restarting ``position_ids``);
* ``padded``: the same algorithms with ``batch_layout="padded"`` (today's right-padded rows);
* ``reference``: written here, each sequence run *alone* through the plain transformers model (no
  padding, no packing), the loss assembled by hand: SFT = sum of the target tokens' NLL / number of
  target tokens of the micro-batch (a token mean over the batch, what ``sft_loss`` documents); RM =
  mean(-log sigmoid(r_c - r_r)) + c * mean((r_c + r_r)^2) with r the value at each sequence's last token.

Tolerance (fp32, CPU): max abs difference <= 1e-5 for the losses and every parameter gradient
(they differ by summation order only). A packed batch whose position ids do not restart lets
attention cross sequences; the test checks that this is caught (the comparison can fail).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from torch import nn

PAD, VOCAB = 0, 40
TOL = 1e-5
# (prompt_len, total_len): ragged totals and prompt lengths, one sample of a single token after its prompt
SFT_SHAPES = [(3, 9), (5, 6), (2, 14), (7, 8), (1, 3), (4, 11)]
PAIR_SHAPES = [(9, 5), (4, 12), (7, 7), (2, 10)]  # (chosen_len, rejected_len)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from rlhf_hybrid.testing import world_of_one

    with world_of_one():
        yield


def _tiny_llama(attn: str, seed: int = 0):
    from rlhf_hybrid import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                               pad_token_id=PAD))
    model.set_attn_implementation(attn)
    return model.float()


def _engine(module: nn.Module):
    from rlhf_hybrid.testing import grad_only

    return grad_only(module)


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    from rlhf_hybrid.testing import param_grads

    return param_grads(module)


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOL, f"{what}: max abs gradient difference {worst:.3g} > {TOL}"


def _sft_examples() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist(), "prompt_len": p} for p, n in SFT_SHAPES]


def _sft_reference(model: nn.Module, examples: list[dict], mask_prompt: bool) -> torch.Tensor:
    """Sum of the target tokens' NLL (each sample alone) / number of target tokens; backward on ``model``."""
    total, count = torch.zeros(()), 0
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (n - 1, V): predicts token j + 1
        nll = -logp.gather(1, ids[0, 1:, None]).squeeze(1)  # (n - 1,)
        first = e["prompt_len"] if mask_prompt else 1  # first target token (never token 0: nothing predicts it)
        first = max(first, 1)
        total = total + nll[first - 1 :].sum()
        count += len(e["input_ids"]) - first
    loss = total / count
    loss.backward()
    return loss.detach()


# the packed shapes, worked out by hand: "rows" = first fit into rows of the longest sample (14 tokens):
# [9, 3] [6, 8] [14] [11]; "one_row" = all 51 tokens in one row
SFT_PACKED_SHAPES = {"rows": (4, 14), "one_row": (1, 51)}
# pairs: chosen 9, 4, 7, 2 then rejected 5, 12, 7, 10 into rows of 12: [9, 2] [4, 7] [5, 7] [12] [10]; one row: 56
PAIR_PACKED_SHAPES = {"rows": (5, 12), "one_row": (1, 56)}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mask_prompt", [True, False])
@pytest.mark.parametrize("layout", ["rows", "one_row"])
def test_sft_packed_equals_padded_and_reference(attn: str, mask_prompt: bool, layout: str) -> None:
    from rlhf_algos import SFT, SFTConfig

    examples = _sft_examples()
    base = _tiny_llama(attn)
    ref_model = copy.deepcopy(base)
    want = _sft_reference(ref_model, examples, mask_prompt)
    got = {}
    for layout_ in (layout, "padded"):
        engine = _engine(copy.deepcopy(base))
        sft = SFT(SFTConfig(mask_prompt=mask_prompt, batch_layout=layout_), policy=engine)
        batch = sft.collate(examples, PAD)
        assert ("attention_mask" in batch) is (layout_ == "padded")
        if layout_ != "padded":
            assert batch["input_ids"].shape == SFT_PACKED_SHAPES[layout]
        loss = sft.learn(batch)["loss"]
        got[layout_] = (loss, _grads(engine.engine.module))
        assert abs(loss - want.item()) <= TOL, (layout_, loss, want.item())
        _assert_same(got[layout_][1], _grads(ref_model), f"batch_layout={layout_} vs reference")
    assert abs(got[layout][0] - got["padded"][0]) <= TOL
    _assert_same(got[layout][1], got["padded"][1], "packed vs padded")


def test_positions_that_do_not_restart_let_attention_cross_and_are_caught() -> None:
    """The comparison above can fail: the same packed row with positions 0..T-1 (one long sequence) gives
    another loss, because attention then crosses the samples."""
    from rlhf_algos import SFT, SFTConfig

    examples = _sft_examples()
    base = _tiny_llama("sdpa")
    want = _sft_reference(copy.deepcopy(base), examples, True)
    sft = SFT(SFTConfig(batch_layout="one_row"), policy=_engine(base))
    batch = sft.collate(examples, PAD)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    assert abs(sft.learn(batch)["loss"] - want.item()) > 100 * TOL


def _value_model(attn: str):
    from rlhf_hybrid import ValueModel

    vm = ValueModel(_tiny_llama(attn, seed=1))
    head = next(m for m in vm.modules() if isinstance(m, nn.Linear) and m.out_features == 1)
    torch.manual_seed(5)
    nn.init.normal_(head.weight, std=0.5)  # a fresh head is all zero: the backbone would get no gradient
    return vm


def _pairs() -> list[dict]:
    g = torch.Generator().manual_seed(4)
    return [{"chosen_ids": torch.randint(1, VOCAB, (c,), generator=g).tolist(),
             "rejected_ids": torch.randint(1, VOCAB, (r,), generator=g).tolist(), "prompt_len": 1, "meta": {}}
            for c, r in PAIR_SHAPES]


def _rm_reference(vm: nn.Module, pairs: list[dict], coef: float) -> torch.Tensor:
    """Each sequence alone through the value model, scored at its last token; the loss by hand."""
    def alone(ids):
        t = torch.tensor([ids])
        return vm(t, torch.ones_like(t))[0, -1]

    c = torch.stack([alone(p["chosen_ids"]) for p in pairs])
    r = torch.stack([alone(p["rejected_ids"]) for p in pairs])
    loss = -torch.nn.functional.logsigmoid(c - r).mean() + coef * ((c + r) ** 2).mean()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["rows", "one_row"])
def test_rm_packed_equals_padded_and_reference(attn: str, layout: str) -> None:
    from rlhf_algos import RM, RMConfig

    pairs, coef = _pairs(), 0.05
    base = _value_model(attn)
    ref_model = copy.deepcopy(base)
    want = _rm_reference(ref_model, pairs, coef)
    got = {}
    for layout_ in (layout, "padded"):
        engine = _engine(copy.deepcopy(base))
        rm = RM(RMConfig(center_coef=coef, batch_layout=layout_), model=engine)
        batch = rm.collate(pairs, PAD)
        if layout_ != "padded":
            assert batch["input_ids"].shape == PAIR_PACKED_SHAPES[layout]
        m = rm.learn(batch)
        got[layout_] = (m["loss"], _grads(engine.engine.module))
        assert abs(m["loss"] - want.item()) <= TOL, (layout_, m["loss"], want.item())
        _assert_same(got[layout_][1], _grads(ref_model), f"batch_layout={layout_} vs reference")
    assert abs(got[layout][0] - got["padded"][0]) <= TOL
    _assert_same(got[layout][1], got["padded"][1], "packed vs padded")


def test_packed_rows_are_refused_with_flash_attention_on_more_than_one_row() -> None:
    """flash attention keeps packed sequences apart on one row only (transformers' _is_packed_sequence)."""
    from rlhf_hybrid.packed import packed_positions_checked

    class FlashModel(nn.Module):
        config = type("C", (), {"_attn_implementation": "flash_attention_2"})()

    two_rows = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]])
    with pytest.raises(ValueError, match="flash_attention_2.*single row.*2 rows"):
        packed_positions_checked(FlashModel(), two_rows)
    assert packed_positions_checked(FlashModel(), two_rows[:1]) is not None
    with pytest.raises(ValueError, match="need position_ids"):
        packed_positions_checked(FlashModel(), None)


def test_a_bad_layout_names_the_field_the_value_and_the_choices() -> None:
    from rlhf_algos import RMConfig, SFTConfig

    with pytest.raises(ValueError, match=r"sft.batch_layout: 'yes' is not allowed; allowed: 'padded', 'rows', 'one_row'"):
        SFTConfig(batch_layout="yes")
    with pytest.raises(ValueError, match=r"rm.batch_layout: True is not allowed"):
        RMConfig(batch_layout=True)


@pytest.mark.parametrize(("attn", "layout"), [("sdpa", "rows"), ("eager", "rows"), ("flash_attention_2", "one_row")])
def test_the_layout_follows_the_attention_implementation(attn: str, layout: str) -> None:
    from rlhf_hybrid import ValueModel, padding_free_layout

    model = _tiny_llama("eager")
    value = ValueModel(model)  # built while eager: building a model under flash attention needs flash-attn
    for m in (model, value):
        m.config._attn_implementation = attn  # flash-attn is not installed here: only the name is read
        assert padding_free_layout(m) == layout


def test_padding_free_and_dataset_packing_together_are_refused() -> None:
    from rlhf_algos import SFTConfig
    from rlhf_cli.config import load_config
    from rlhf_cli.config_sections import ConfigError

    with pytest.raises(ConfigError, match=r"sft.padding_free: true together with sft.packing=true"):
        load_config(None, ["sft.padding_free=true", "sft.packing=true"])
    with pytest.raises(ValueError, match=r"sft.batch_layout: 'rows' is not allowed; allowed: 'padded' with packing"):
        SFTConfig(packing=True, batch_layout="rows")
