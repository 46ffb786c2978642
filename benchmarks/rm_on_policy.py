"""The reward model as PPO sees it: how it ranks the policy's *own* samples against the demo's verifier.

    python benchmarks/rm_on_policy.py OUT SEED [K [POLICY_DIR]]

OUT is an `rlhf run` output directory with sft/ and rm/ (the demo task, seed SEED); POLICY_DIR
(default OUT/sft) is the policy that samples. K answers (default 4) are sampled at temperature 1 for
each of the first 256 RL prompts; each is scored by the reward model and by the verifier. Prints
JSON: the verifier score (all, carry, non-carry questions), the share of forgotten carries, the
reward model's ranking agreement (AUC: P(score of a right answer > score of a wrong one), ties 0.5)
over all pairs, within each prompt's group and right-vs-forgotten-carry on carry questions, the
reward model's between-prompt spread (std of each prompt's mean score) against its within-prompt
gap (mean right-minus-wrong score in groups that have both), and the policy's entropy per token.
Not part of the tests; docs/demo-task.md quotes its output. One process, about a minute on 2 cores.
"""
import json
import os
import sys

import torch
from rlhf_algos import ModelReward, generate_responses
from rlhf_algos.functional import ranking_agreement
from rlhf_cli.config import load_config
from rlhf_cli.context import Context, load_data, tokenized
from rlhf_cli.report import Reporter
from rlhf_data import collate_prompts
from rlhf_hybrid import EngineConfig, HybridEngine, ValueModel, load_causal_lm, load_tokenizer

for k_, v_ in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "29533", "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(k_, v_)
base, seed = sys.argv[1], int(sys.argv[2])
k = int(sys.argv[3]) if len(sys.argv) > 3 else 4
policy_dir = sys.argv[4] if len(sys.argv) > 4 else f"{base}/sft"
torch.manual_seed(0)
cfg = load_config(None, [f"seed={seed}", f"out={base}"])
ctx = Context(cfg, Reporter(enabled=False))
data = load_data(ctx)
tok = load_tokenizer(f"{base}/sft")
ec = EngineConfig(micro_batch_size=64)
actor = HybridEngine(load_causal_lm(policy_dir), ec, trainable=False)
rm = ModelReward(HybridEngine(ValueModel.from_pretrained(f"{base}/rm"), ec, trainable=False))
prompts = tokenized(ctx, tok, data.rl, "rl", "rl", {})[:256]
rows = []
for i in range(0, len(prompts), 64):
    chunk = prompts[i:i + 64]
    b = collate_prompts(chunk, tok.pad_token_id)
    ids = b["input_ids"].repeat_interleave(k, 0)
    am = b["attention_mask"].repeat_interleave(k, 0)
    meta = [m for m in b["meta"] for _ in range(k)]
    gen = generate_responses(actor, ids, am, max_new_tokens=8, do_sample=True, temperature=1.0,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    seqs, attn, P, rmask = gen.sequences, gen.attention_mask, gen.prompt_len, gen.response_mask
    lp, ent = actor.token_logprobs(seqs, attn, P, return_entropy=True)
    s = rm(seqs, attn, P, meta)
    texts = tok.batch_decode(seqs[:, P:], skip_special_tokens=True)
    for j in range(len(texts)):
        a, bb = meta[j]["a"], meta[j]["b"]
        rows.append({"a": a, "b": bb, "resp": texts[j].strip(), "ok": data.verifier(texts[j], meta[j]),
                     "carry": (a % 10 + bb % 10) >= 10, "rm": float(s[j]),
                     "ent": float((ent[j] * rmask[j]).sum() / rmask[j].sum())})


def auc(rs):
    """The reward model's agreement with the verifier over ``rs`` (rlhf_algos' one definition)."""
    if len({r["ok"] for r in rs}) < 2:
        return None
    return float(ranking_agreement(torch.tensor([r["rm"] for r in rs]), torch.tensor([r["ok"] for r in rs])))


def within_prompt_auc(rs):
    """Agreement pooled over the pairs inside each prompt's group (per-prompt offsets cancel)."""
    wins = pairs = 0.0
    for g in _groups(rs).values():
        a = auc(g)
        if a is not None:
            n = sum(r["ok"] == 1 for r in g) * sum(r["ok"] == 0 for r in g)
            wins, pairs = wins + a * n, pairs + n
    return (wins / pairs if pairs else None), int(pairs)


def _groups(rs):
    out = {}
    for r in rs:
        out.setdefault((r["a"], r["b"]), []).append(r)
    return out


carry = [r for r in rows if r["carry"]]
nocarry = [r for r in rows if not r["carry"]]
fc = [r for r in carry if r["ok"] == 0 and r["resp"] == str(r["a"] + r["b"] - 10)]
out = {
    "n": len(rows), "score": sum(r["ok"] for r in rows) / len(rows),
    "score_carry": sum(r["ok"] for r in carry) / len(carry),
    "score_nocarry": sum(r["ok"] for r in nocarry) / len(nocarry),
    "forgot_carry_frac_of_carry": len(fc) / len(carry),
    "auc_all": auc(rows), "auc_carry": auc(carry), "auc_nocarry": auc(nocarry),
    "within_prompt_auc": within_prompt_auc(rows),
    "rm_mean_ok": sum(r["rm"] for r in rows if r["ok"]) / max(1, sum(r["ok"] for r in rows)),
    "rm_mean_bad": sum(r["rm"] for r in rows if not r["ok"]) / max(1, sum(1 - r["ok"] for r in rows)),
    "rm_std": float(torch.tensor([r["rm"] for r in rows]).std()),
    "entropy_per_token": sum(r["ent"] for r in rows) / len(rows),
    "auc_correct_vs_forgotcarry_carry": auc([r for r in carry if r["ok"] == 1] + fc),
}
gm = torch.tensor([sum(x["rm"] for x in g) / len(g) for g in _groups(rows).values()])
out["rm_between_prompt_std"] = float(gm.std())
diffs = []
for g in _groups(rows).values():
    pos = [x["rm"] for x in g if x["ok"] == 1]
    neg = [x["rm"] for x in g if x["ok"] == 0]
    if pos and neg:
        diffs.append(sum(pos) / len(pos) - sum(neg) / len(neg))
out["rm_within_prompt_gap_mean"] = sum(diffs) / max(1, len(diffs))
out["n_mixed_groups"] = len(diffs)
print(json.dumps(out, indent=1))
