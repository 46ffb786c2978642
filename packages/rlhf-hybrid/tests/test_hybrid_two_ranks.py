"""Two gloo ranks under ZeRO-3 (every parameter sharded), spawned processes on the CPU.

The fast generation path gathers the shards collectively, then generates; with
``inference_tp_size=2`` the two ranks also split every layer's heads and MLP between them and
generate both ranks' prompts together. Either way each rank's greedy tokens must equal HF
``generate`` on the unsharded weights for its own prompts, and the log-probs the generator reports
for them (``return_logprobs``, cut to the rank's own rows and steps under tensor parallelism) must
equal the training forward's ``token_logprobs``.

The gather itself (one all-gather per layer, rlhf_hybrid.gather) is checked against DeepSpeed's own
GatheredParameters: exactly equal, and through the int8 wire format within half a quantization
step of it, with a quarter of the bytes sent.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from rlhf_hybrid.distributed import free_port

PAD, EOS, VOCAB, NEW = 0, 1, 97, 24


def tiny_model(family: str):
    torch.manual_seed(0)
    if family == "opt":
        from transformers import OPTConfig, OPTForCausalLM

        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS,
                        bos_token_id=EOS)
        return OPTForCausalLM(cfg).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def prompts(rank: int):
    from rlhf_hybrid.testing import ragged_prompts

    return ragged_prompts(VOCAB, (5, 2, 7) if rank == 0 else (3, 6, 1), pad=PAD, low=2, seed=rank + 1)


def _worker(rank: int, world: int, port: int, out_dir: str, family: str, tp: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from rlhf_hybrid import EngineConfig, HybridEngine, init_distributed

    init_distributed()
    engine = HybridEngine(tiny_model(family), EngineConfig(zero_stage=3, micro_batch_size=3, generation="fast",
                                                           inference_tp_size=tp))
    ids, mask = prompts(rank)
    seqs, lp = engine.generate(ids, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
                               return_logprobs=True)
    # the generator's log-probs (cut to this rank's rows under tensor parallelism) == the training forward's
    P = ids.shape[1]
    is_eos = (seqs[:, P:] == EOS).long()
    valid = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first EOS
    want_lp = engine.token_logprobs(seqs, torch.cat([mask, valid.long()], dim=1), P).float()  # collective
    lp_err = float((lp - want_lp)[valid].abs().max())
    # the shards really are shards: this rank holds part of every weight, not all of it
    numel = sum(p.ds_tensor.numel() for p in engine.module.parameters())
    full = sum(p.ds_numel for p in engine.module.parameters())
    result = {"seqs": seqs.cpu(), "numel": numel, "full": full, "path": engine.generation_used,
              "collectives": engine.timings["gather_collectives"], "lp_shape": tuple(lp.shape), "lp_err": lp_err,
              "lp_zero_after_eos": bool((lp[~valid] == 0).all())}
    if tp == 1:
        import dataclasses

        from rlhf_hybrid.gather import gather_full_params
        from rlhf_hybrid.inference import fused_groups

        reference = engine.full_state_dict()  # DeepSpeed's GatheredParameters, one parameter at a time
        fused = fused_groups(engine.module)
        exact, s0 = gather_full_params(engine.module, fused=fused)
        q8, s8 = gather_full_params(engine.module, fused=fused, quantization="int8")
        result["exact_equal"] = all(torch.equal(exact[k], reference[k]) for k in exact)
        result["keys_missing"] = sorted(set(reference) - set(exact) - {"lm_head.weight"})
        result["int8_err"] = max(float((q8[k] - reference[k]).abs().max()) for k in q8)
        result["absmax"] = max(float(reference[k].abs().max()) for k in q8)
        result["bytes"] = (s0.bytes_sent, s8.bytes_sent, s8.bytes_unquantized)
        engine.cfg = dataclasses.replace(engine.cfg, gather_quantization="int8")
        q8_seqs = engine.generate(ids, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        result["int8_seqs_shape"] = tuple(q8_seqs.shape)
        result["int8_sent_mib"] = engine.timings["gather_sent_mib"]
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()




@pytest.mark.slow
@pytest.mark.parametrize(("family", "tp"), [("llama", 1), ("llama", 2), ("opt", 2)])
def test_zero3_two_ranks_fast_greedy_matches_hf(tmp_path, family: str, tp: int) -> None:
    # This file runs as a script (see the bottom) so that the spawned ranks can import `_worker`
    # from __main__ whatever import mode pytest used for this module.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), family, str(tp)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    hf = tiny_model(family)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["numel"] < r["full"], "ZeRO-3 did not shard the parameters"
        assert r["path"] == "fast", "the engine fell back to transformers generate"
        ids, mask = prompts(rank)
        with torch.no_grad():
            want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                               eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(r["seqs"], want), (rank, r["seqs"], want)
        assert r["lp_shape"] == (3, want.shape[1] - ids.shape[1])
        assert r["lp_err"] < 1e-5 and r["lp_zero_after_eos"], r
        assert r["collectives"] == 3  # embeddings/head/final norm, then one per decoder layer
        if tp == 1:
            assert r["exact_equal"] and not r["keys_missing"]
            # blockwise absmax int8: each element within half a step (absmax of its block / 127 / 2)
            assert 0 < r["int8_err"] <= r["absmax"] / 254 * 1.001
            exact_bytes, int8_bytes, unquantized = r["bytes"]
            assert exact_bytes == unquantized and int8_bytes < 0.3 * exact_bytes  # fp32 -> int8 + scales
            assert r["int8_seqs_shape"][0] == 3 and r["int8_sent_mib"] * 2**20 == int8_bytes


if __name__ == "__main__":
    mp.spawn(_worker, args=(2, free_port(), sys.argv[1], sys.argv[2], int(sys.argv[3])), nprocs=2, join=True)
