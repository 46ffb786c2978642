"""LoRA from the CLI (``lora.*`` keys): `rlhf run --stage sft` on a tiny model given with
--actor-model trains only the adapters, and its checkpoint is a plain HF model holding the fused
weights. Checked against the base model the test wrote: every weight outside the targeted layers
is bit-identical, and each targeted weight moved by a matrix of rank <= lora.rank (the fused
``(alpha / r) B A``); nothing else can have trained."""

from __future__ import annotations

import json

import pytest
import torch

# a 20-step SFT on the demo data: enough to move the adapters, a few seconds of training
TINY = ["data.num_eval=40", "data.num_valid=20", "data.sft_samples=320", "sft.epochs=1", "sft.batch_size=16",
        "sft.warmup_steps=0", "sft.lr=0.01"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_demo_model):
    """A tiny random Llama with the demo's tokenizer, saved as an HF checkpoint."""
    torch.manual_seed(0)
    return tiny_demo_model(tmp_path_factory.mktemp("lora") / "base", hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=64)


def test_sft_with_lora_trains_only_the_adapters_and_saves_a_plain_model(base_dir, tmp_path, rlhf, explain) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    proc = rlhf(["run", "--stage", "sft", "--out", out, "--actor-model", base_dir, *TINY, "lora.rank=4",
                 "lora.alpha=8", "lora.targets=q_proj,v_proj,down_proj"], timeout=240)
    assert proc.returncode == 0, explain(proc)
    assert "sft: LoRA rank 4 (alpha 8) on 6 layers (q_proj, v_proj, down_proj)" in proc.stderr, explain(proc)
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(out / "sft").state_dict()  # a plain model: no adapter keys
    assert tuned.keys() == base.keys()
    targeted = [k for k in base if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]
    assert len(targeted) == 6
    for k in base:
        if k not in targeted:
            assert torch.equal(tuned[k], base[k]), f"{k} changed: only the adapters should train"
    for k in targeted:
        delta = tuned[k] - base[k]
        assert delta.abs().max() > 1e-4, f"{k}: the adapters did not move"
        assert torch.linalg.matrix_rank(delta, atol=1e-5) <= 4, f"{k}: the update is not low-rank"
    card = json.loads((out / "sft" / "run_card.json").read_text())
    assert card["config"]["lora"]["rank"] == 4


def test_lora_targets_matching_no_layer_is_one_error_line(base_dir, tmp_path, rlhf) -> None:
    proc = rlhf(["run", "--stage", "sft", "--out", tmp_path / "out", "--actor-model", base_dir, *TINY,
                 "lora.rank=4", "lora.targets=q_proj,qkv_proj"], timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("error: lora.targets: 'qkv_proj'"), proc.stderr
    assert "no linear layer of LlamaForCausalLM" in lines[-1] and "o_proj" in lines[-1], lines[-1]


def test_bad_lora_rank_is_one_error_line(tmp_path, rlhf) -> None:
    proc = rlhf(["run", "--stage", "sft", "--out", tmp_path / "out", "lora.rank=-1"], timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: lora.rank: must be >= 0 (0 = no LoRA), got -1", proc.stderr
