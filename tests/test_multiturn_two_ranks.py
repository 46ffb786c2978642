"""Multi-turn rollouts on two gloo ranks under ZeRO-3 (every parameter sharded), hf and fast paths.

Each turn's ``generate`` gathers the sharded weights (a collective), and rank 0's trajectories all end
after one turn while rank 1's run three and two turns. The turn loop must keep the ranks in step
(``HybridEngine.any_rank_active`` before every turn, ``RePrefillSession.idle`` on a rank with nothing
left); the fast path gathers once per rollout (``turn_session``) and needs no such step. So:

* both ranks finish (a hang fails at the timeout: the gloo timeout is 60 s, the test's 300 s), and the
  collectives after the rollout (a ZeRO-3 forward) still line up;
* on the hf path rank 0 idled through exactly the two turns it had nothing to do in, rank 1 never;
* each rank's trajectories equal a single-process run (ZeRO-0, the unsharded weights, the same seed)
  on the same prompts: token ids, loss masks and turn counts exactly, sampling log-probs within 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

PAD, EOS, VOCAB = 0, 1, 97
TEMPERATURE = 0.7
# rank 0: every trajectory ends after 1 turn; rank 1: after 3 and 2 turns
RECORDS = {0: [{"turns": 1}, {"turns": 1}], 1: [{"turns": 3}, {"turns": 2}]}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


class TurnsEnv:
    """Ends after ``record['turns']`` model turns; replies three token ids after every other turn."""

    name, description = "turns", "test"

    def reset(self, record: dict) -> None:
        self.left = record["turns"]

    def step(self, action: str):
        from rlhf_algos.environments import StepResult

        self.left -= 1
        return StepResult(reward=1.0, done=True) if self.left == 0 else StepResult(reply=[5, 6, 7], reward=0.5)


def prompts(rank: int):
    from rlhf_hybrid.testing import ragged_prompts

    return ragged_prompts(VOCAB, (4, 2) if rank == 0 else (3, 5), pad=PAD, low=2, seed=rank + 1)


def rollout(engine, rank: int):
    """This rank's episodes (sampled, seeded) and how many turns it idled through."""
    from rlhf_algos.environments import EpisodeBudget
    from rlhf_algos.trajectories import make_session, run_episodes

    ids, mask = prompts(rank)
    budget = EpisodeBudget(max_turns=4, max_turn_tokens=5, max_total_tokens=40)
    torch.manual_seed(100 + rank)
    session = make_session(engine, ids, mask, max_total_tokens=budget.max_total_tokens, eos_token_id=EOS,
                           pad_token_id=PAD, do_sample=True, temperature=TEMPERATURE)
    idled = []
    if hasattr(session, "idle"):
        real_idle = session.idle
        session.idle = lambda: (idled.append(1), real_idle())[1]
    batch = run_episodes(session, [TurnsEnv() for _ in RECORDS[rank]], RECORDS[rank], budget=budget,
                         decode=lambda t: " ".join(map(str, t)), encode=lambda s: [int(x) for x in s.split()],
                         prompt_ids=ids, prompt_mask=mask, pad_token_id=PAD, vocab_size=VOCAB)
    return batch, len(idled)


def _worker(rank: int, world: int, port: int, out_dir: str, generation: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from rlhf_hybrid import EngineConfig, HybridEngine, init_distributed

    init_distributed(timeout_s=60)  # a collective mismatch fails within a minute instead of hanging
    engine = HybridEngine(tiny_llama(), EngineConfig(zero_stage=3, micro_batch_size=2, generation=generation))
    engine.eval()
    batch, idled = rollout(engine, rank)
    # after the rollout the ranks must still be in step: a ZeRO-3 forward (collective) on the trajectories
    with torch.no_grad():
        lp = engine.token_logprobs(batch.sequences, batch.attention_mask, batch.prompt_len,
                                   temperature=TEMPERATURE).float().cpu()
    numel = sum(p.ds_tensor.numel() for p in engine.module.parameters())
    full = sum(p.ds_numel for p in engine.module.parameters())
    torch.save({"batch": batch, "idled": idled, "lp": lp, "numel": numel, "full": full,
                "path": engine.generation_used}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.usefixtures("in_process_world")
@pytest.mark.parametrize("generation", ["hf", "fast"])
def test_ranks_ending_at_different_turns_stay_in_step_and_match_one_process(tmp_path, generation: str) -> None:
    from rlhf_hybrid import EngineConfig, HybridEngine
    from rlhf_hybrid.distributed import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    try:
        proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(free_port()), generation], env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the two ranks did not finish within 300 s (hang): {str(e.stderr)[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    reference = HybridEngine(tiny_llama(), EngineConfig(zero_stage=0, micro_batch_size=2, generation=generation))
    reference.eval()
    # the fast path gathers once per rollout and its turns run no collective: no rank idles
    idles = (2, 0) if generation == "hf" else (0, 0)
    for rank, want_turns, want_idled in ((0, [1, 1], idles[0]), (1, [3, 2], idles[1])):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert r["numel"] < r["full"], "ZeRO-3 did not shard the parameters"
        assert r["path"] == generation
        got, (want, _) = r["batch"], rollout(reference, rank)
        assert got.num_turns.tolist() == want.num_turns.tolist() == want_turns
        assert got.end_reasons == ["done", "done"]
        assert r["idled"] == want_idled, r["idled"]
        assert torch.equal(got.sequences, want.sequences), (rank, got.sequences, want.sequences)
        assert torch.equal(got.loss_mask, want.loss_mask) and torch.equal(got.attention_mask, want.attention_mask)
        assert (got.sample_logprobs - want.sample_logprobs).abs().max().item() <= 1e-5
        m = got.loss_mask.bool()
        assert (r["lp"][m] - got.sample_logprobs[m]).abs().max().item() <= 1e-4  # the ZeRO-3 forward agrees


if __name__ == "__main__":
    mp.spawn(_worker, args=(2, int(sys.argv[2]), sys.argv[1], sys.argv[3]), nprocs=2, join=True)
