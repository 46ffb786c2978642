"""Models built ZeRO-3 partitioned from the first byte (rlhf_hybrid.zero_init), two gloo ranks on the CPU.

Each rank holds only its partition of every weight from construction on; the gathered weights equal
the same model built whole (random init from a config, same seed) and the checkpoint's weights exactly
(``from_pretrained``); an engine made from the partitioned model trains exactly as one made from the
whole model; its greedy tokens equal HF ``generate`` on the whole model. The same with ZeRO-3 offload:
a frozen reward model with its parameters on the CPU scores as the whole model does, and a trainable
model with parameters and optimizer state offloaded takes the same step (on a CPU-only machine the
offload device is where the weights already are, so this checks the configuration path and numbers,
not the transfers).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from rlhf_hybrid.distributed import free_port

PAD, VOCAB, NEW = 0, 97, 12


def llama_config():
    from transformers import LlamaConfig

    # initializer_range 0.3 (not 0.02): random weights whose greedy tokens vary, so the comparison can fail
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=PAD,
                       eos_token_id=None, bos_token_id=None, initializer_range=0.3)


def batch(rank: int):
    from rlhf_hybrid.testing import ragged_prompts

    return ragged_prompts(VOCAB, (5, 2, 7) if rank == 0 else (3, 6, 1), pad=PAD, low=2, seed=rank + 1)


def _train_step(engine, rank: int) -> float:
    """One AdamW step on a fixed per-rank batch; returns the loss."""
    ids, mask = batch(rank)
    loss = -(engine.token_logprobs(ids, mask, 1).float() * mask[:, 1:]).sum() / mask[:, 1:].sum()
    engine.backward(loss)
    engine.step()
    return float(loss)


def _worker(rank: int, world: int, port: int, out_dir: str, ckpt: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from rlhf_hybrid import EngineConfig, HybridEngine, init_distributed
    from rlhf_hybrid.zero_init import build_causal_lm, build_value_model, local_numel

    init_distributed()
    cfg = EngineConfig(zero_stage=3, micro_batch_size=3, lr=1e-2, generation="fast")
    res: dict = {}
    # 1. random init from a config: partitioned at construction, equal to the whole build
    part = build_causal_lm(llama_config(), cfg, seed=7)
    res["numel_built"] = local_numel(part)
    actor = HybridEngine(part, cfg, name="actor")
    res["init_state"] = actor.full_state_dict()
    ids, mask = batch(rank)
    res["fast_seqs"] = actor.generate(ids, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                      pad_token_id=PAD)
    res["fast_path"] = actor.generation_used
    whole = HybridEngine(build_causal_lm(llama_config(), cfg, seed=7, partition=False), cfg, name="whole")
    res["loss_part"], res["loss_whole"] = _train_step(actor, rank), _train_step(whole, rank)
    res["step_part"], res["step_whole"] = actor.full_state_dict(), whole.full_state_dict()
    # 2. from_pretrained: partitioned, the checkpoint's weights exactly; a frozen reward model offloaded
    lm = build_causal_lm(ckpt, cfg)
    res["numel_loaded"] = local_numel(lm)
    res["loaded_state"] = HybridEngine(lm, cfg, trainable=False, name="reference").full_state_dict()
    frozen_off = EngineConfig(zero_stage=3, micro_batch_size=3, offload_param=True)
    reward = HybridEngine(build_value_model(ckpt, frozen_off, trainable=False), frozen_off, trainable=False,
                          name="reward")
    res["numel_reward"] = local_numel(reward.module)
    with torch.no_grad():
        res["scores"] = reward.score(ids, mask)
    hf_off = HybridEngine(build_causal_lm(ckpt, frozen_off, trainable=False), frozen_off, trainable=False, name="ref")
    res["hf_seqs"] = hf_off.generate(ids, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                     pad_token_id=PAD)
    # 3. trainable, parameters and optimizer state offloaded: the same step as the whole-built engine's
    off = EngineConfig(zero_stage=3, micro_batch_size=3, lr=1e-2, offload_param=True, offload_optimizer=True,
                       generation="fast")
    offloaded = HybridEngine(build_causal_lm(llama_config(), off, seed=7), off, name="offloaded")
    res["zero_conf"] = offloaded.engine.config["zero_optimization"]
    res["fast_off_seqs"] = offloaded.generate(ids, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                              pad_token_id=PAD)
    res["fast_off_path"] = offloaded.generation_used
    res["loss_off"] = _train_step(offloaded, rank)
    res["step_off"] = offloaded.full_state_dict()
    # 4. the older value-model format (causal LM + value_head.safetensors): partitioned, the files' tensors
    frozen = EngineConfig(zero_stage=3, micro_batch_size=3)
    old = build_value_model(ckpt + "_old", frozen, trainable=False)
    res["numel_old"] = local_numel(old)
    old_engine = HybridEngine(old, frozen, trainable=False, name="old_rm")
    res["old_state"] = old_engine.full_state_dict()
    with torch.no_grad():
        res["old_scores"] = old_engine.score(ids, mask)
    # 5. gradient checkpointing on a partitioned build: the same loss and SGD step as without
    for gc in (False, True):
        sgd = EngineConfig(zero_stage=3, micro_batch_size=3, lr=0.5, optimizer="sgd", max_grad_norm=0,
                           gradient_checkpointing=gc, extra={"zero_allow_untested_optimizer": True})
        engine = HybridEngine(build_causal_lm(llama_config(), sgd, seed=7), sgd, name=f"gc{int(gc)}")
        engine.train()
        res[f"gc_loss{int(gc)}"] = _train_step(engine, rank)
        res[f"gc_step{int(gc)}"] = engine.full_state_dict()
    # 6. seed=None (the CLI's demo model): transformers' init from the global RNG, partitioned
    torch.manual_seed(41)
    drawn = build_causal_lm(llama_config(), cfg, seed=None)
    res["rng_after_global"] = torch.rand(3)
    res["numel_global"] = local_numel(drawn)
    res["global_state"] = HybridEngine(drawn, cfg, trainable=False, name="global").full_state_dict()
    torch.manual_seed(rank)  # ranks that would draw different weights: refused, not mixed
    try:
        build_causal_lm(llama_config(), cfg, seed=None)
        res["rng_refusal"] = None
    except ValueError as e:
        res["rng_refusal"] = str(e)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()




def _saved_checkpoint(path) -> dict[str, torch.Tensor]:
    from rlhf_hybrid.testing import tiny_model

    model = tiny_model("llama-gqa", seed=3)  # weights std 0.3: greedy tokens vary
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_zero3_partitioned_construction_two_ranks(tmp_path) -> None:
    from rlhf_hybrid import ValueModel
    from rlhf_hybrid.zero_init import build_causal_lm

    ckpt = tmp_path / "ckpt"
    saved = _saved_checkpoint(ckpt)
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    shutil.copytree(ckpt, tmp_path / "ckpt_old")  # the older reward-model format: the causal LM + its value head
    v_head = torch.randn(1, saved["model.embed_tokens.weight"].shape[1], generator=torch.Generator().manual_seed(2))
    save_file({"v_head.weight": v_head}, str(tmp_path / "ckpt_old" / "value_head.safetensors"))
    # This file runs as a script (see the bottom) so that the spawned ranks can import `_worker`.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(ckpt)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    from rlhf_hybrid import EngineConfig

    whole = build_causal_lm(llama_config(), EngineConfig(), seed=7, partition=False).eval()  # built whole, ZeRO-0
    hf_ckpt = type(whole).from_pretrained(ckpt).eval()
    rm = ValueModel.from_pretrained(str(ckpt)).eval()
    torch.manual_seed(41)
    global_whole = AutoModelForCausalLM.from_config(llama_config()).state_dict()
    rng_after_global = torch.rand(3)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for rank, r in enumerate(results):
        for key in ("numel_built", "numel_loaded"):  # each rank holds half of every weight (padded to even)
            local, total = r[key]
            assert total == sum(p.numel() for p in whole.parameters())
            assert local <= total // 2 + 2 * len(list(whole.parameters())), (key, local, total)
        local, total = r["numel_reward"]
        assert local < 0.55 * total
        # random init: the same weights as the model built whole with the same seed, exactly
        assert r["init_state"].keys() == whole.state_dict().keys()
        for k, v in whole.state_dict().items():
            assert torch.equal(r["init_state"][k], v), k
        # from_pretrained: the checkpoint's weights, exactly
        for k, v in saved.items():
            assert torch.equal(r["loaded_state"][k], v), k
        ids, mask = batch(rank)
        with torch.no_grad():
            want = whole.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                  eos_token_id=None, pad_token_id=PAD)
            want_ckpt = hf_ckpt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                         eos_token_id=None, pad_token_id=PAD)
            want_scores = rm(ids, mask)[:, -1]  # left padding: every row's last real token is the last column
        assert r["fast_path"] == "fast"
        assert torch.equal(r["fast_seqs"], want), (rank, r["fast_seqs"], want)
        assert len(set(want[:, ids.shape[1]:].flatten().tolist())) > 2, "degenerate greedy tokens: a weak check"
        assert torch.equal(r["hf_seqs"], want_ckpt), (rank, r["hf_seqs"], want_ckpt)
        # the trainable actor with its parameters offloaded, fast path: HF generate's greedy tokens too
        assert r["fast_off_path"] == "fast" and torch.equal(r["fast_off_seqs"], want), (rank, r["fast_off_seqs"])
        torch.testing.assert_close(r["scores"], want_scores, rtol=1e-5, atol=1e-6)
        # training: the partitioned-built engine's step is the whole-built engine's step
        assert r["loss_part"] == r["loss_whole"]
        for k, v in r["step_whole"].items():
            assert torch.equal(r["step_part"][k], v), k
            assert not torch.equal(v, r["init_state"][k]) or "norm" in k, f"{k} did not change"
        # offloaded parameters and optimizer: the same step, to fp32 rounding
        assert r["zero_conf"]["offload_param"]["device"] == "cpu"
        assert r["zero_conf"]["offload_optimizer"]["device"] == "cpu"
        assert abs(r["loss_off"] - r["loss_whole"]) < 1e-6
        for k, v in r["step_whole"].items():
            torch.testing.assert_close(r["step_off"][k], v, rtol=1e-5, atol=1e-6)
        # the older value-model format, partitioned: the files' tensors exactly, the whole-loaded model's scores
        local, total = r["numel_old"]
        assert local < 0.55 * total
        want_old = {f"model.{k}": v for k, v in saved.items() if not k.startswith("lm_head")}
        assert r["old_state"].keys() == want_old.keys() | {"model.score.weight"}
        for k, v in (want_old | {"model.score.weight": v_head}).items():
            assert torch.equal(r["old_state"][k], v), k
        with torch.no_grad():
            whole_old = ValueModel.from_pretrained(str(tmp_path / "ckpt_old")).eval()
            torch.testing.assert_close(r["old_scores"], whole_old(ids, mask)[:, -1], rtol=1e-5, atol=1e-6)
        # gradient checkpointing: the same forward (loss exactly), the same SGD step to fp32 rounding
        assert r["gc_loss1"] == r["gc_loss0"]
        assert sum(not torch.equal(v, r["init_state"][k]) for k, v in r["gc_step0"].items()) > len(r["gc_step0"]) // 2
        for k, v in r["gc_step0"].items():
            torch.testing.assert_close(r["gc_step1"][k], v, atol=1e-6, rtol=1e-5, msg=k)
        # seed=None: transformers' own whole build from the same global RNG state, and the RNG after it
        local, total = r["numel_global"]
        assert local < 0.55 * total
        assert torch.equal(r["rng_after_global"], rng_after_global)
        for k, v in global_whole.items():
            assert torch.equal(r["global_state"][k], v), k
        assert r["rng_refusal"] and r["rng_refusal"].startswith("seed: None draws the model's weights from the global "
                                                                "RNG, but the ranks' torch RNG states differ")


if __name__ == "__main__":
    mp.spawn(_worker, args=(2, free_port(), sys.argv[1], sys.argv[2]), nprocs=2, join=True)
