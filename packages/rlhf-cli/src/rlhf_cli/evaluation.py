"""How stage 3 is judged: the policy's answers to held-out and validation prompts, scored by the
data's verifier (or a reward), and the ``select=best`` choice of checkpoint on the validation split.
"""

from __future__ import annotations

import torch
from rlhf_algos import TextReward

from .context import Context, tokenized

__all__ = ["Evaluator", "KeepBest", "eval_metric", "evaluate_policy", "kept_message", "per_item",
           "verifier_reward"]


def per_item(verify):
    """A ``verify(response, meta) -> float`` as a batch reward function."""
    return lambda responses, meta: [verify(r, m) for r, m in zip(responses, meta, strict=True)]


def verifier_reward(data, tokenizer) -> TextReward:
    """The data's ground-truth verifier (the demo's) as a reward function."""
    return TextReward(per_item(data.verifier), tokenizer)


def evaluate_policy(actor, tokenizer, scorer, prompts: list[dict], *, do_sample: bool, temperature: float,
                    max_new_tokens: int, batch: int = 256, reference=None) -> dict:
    """Mean ``scorer`` score (and KL to ``reference`` when given) of the policy's answers to ``prompts``.

    ``scorer(sequences, attention_mask, prompt_len, meta) -> (B,)`` is the verifier where the data has
    one, else the reward model (or the reward function). Every rank evaluates the same prompts
    (generation gathers ZeRO-3 weights collectively).
    """
    from rlhf_algos import generate_responses
    from rlhf_algos.functional import kl_penalty
    from rlhf_data import collate_prompts

    scores, kls = [], []
    for i in range(0, len(prompts), batch):
        b = collate_prompts(prompts[i : i + batch], tokenizer.pad_token_id)
        gen = generate_responses(actor, b["input_ids"], b["attention_mask"], max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=temperature, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        seqs, attn, P, rmask = gen.sequences, gen.attention_mask, gen.prompt_len, gen.response_mask
        if scorer is not None:
            scores += scorer(seqs, attn, P, b["meta"]).float().cpu().tolist()
        if reference is not None:
            with torch.no_grad():
                lp = actor.token_logprobs(seqs, attn, P, temperature=temperature).float().cpu()
                ref = reference.token_logprobs(seqs, attn, P, temperature=temperature).float().cpu()
            # k3 (Schulman 2020): unbiased like k1 and never negative, so the reported KL never prints
            # below 0 (a k1 sample mean does when the policy is close to the reference); padding zeroed first
            kls.append((kl_penalty(lp * rmask, ref * rmask, "k3") * rmask).sum(dim=1))
    out = {"score": sum(scores) / len(scores) if scores else None}
    if kls:
        out["kl_to_ref"] = torch.cat(kls).mean().item()
    return out


def eval_metric(data, reward_fn, rl_reward: str):
    """What held-out answers are scored with: the data's verifier if it has one, else the stage's reward."""
    if data.verifier is not None:
        return "verifier_score", None
    return ("reward_model_score" if rl_reward == "model" else "reward_score"), reward_fn


class Evaluator:
    """Held-out and validation scores of the policy being trained, the same for every algorithm."""

    def __init__(self, ctx: Context, tokenizer, data, actor, reference, scorer, metric: str) -> None:
        from rlhf_hybrid import all_reduce_mean

        stats: dict = {}
        self.valid_prompts = tokenized(ctx, tokenizer, data.rl_valid, "rl", "rl validation", stats)
        self.eval_prompts = tokenized(ctx, tokenizer, data.rl_eval, "rl", "rl held-out", stats)
        self.stats, self.metric = stats, metric
        self.actor, self.reference = actor, reference
        self.ev = dict(tokenizer=tokenizer, scorer=scorer, max_new_tokens=ctx.cfg.rl.max_new_tokens,
                       temperature=ctx.cfg.rl.temperature)
        self.all_reduce_mean = all_reduce_mean

    def held_out(self, tag: str) -> dict:
        """Greedy and sampled scores and the KL to the reference on the held-out prompts, keys suffixed ``_tag``."""
        greedy = evaluate_policy(self.actor, prompts=self.eval_prompts, do_sample=False, **self.ev)
        sampled = evaluate_policy(self.actor, prompts=self.eval_prompts, do_sample=True, reference=self.reference,
                                  **self.ev)
        return {f"{self.metric}_{tag}": greedy["score"], f"{self.metric}_sampled_{tag}": sampled["score"],
                f"kl_to_ref_{tag}": sampled.get("kl_to_ref")}

    def validate(self) -> float:
        """Greedy score on the validation prompts (checkpoint selection)."""
        # Averaged over ranks so that every rank takes the same keep-this-checkpoint decision
        # (full_state_dict is collective under ZeRO-3; diverging decisions would deadlock).
        score = evaluate_policy(self.actor, prompts=self.valid_prompts, do_sample=False, **self.ev)["score"]
        return self.all_reduce_mean({"valid": score if score is not None else 0.0})["valid"]


class KeepBest:
    """``select=best``: the weights with the best validation score so far, the starting model's included.

    Args:
        policy: The engine being trained (``full_state_dict`` / ``load_full_state_dict``, collective
            under ZeRO-3).
        enabled: Whether selection is on; off, only ``score`` (the starting validation score) is kept.
        score: The starting model's validation score.
    """

    def __init__(self, policy, enabled: bool, score: float) -> None:
        self.policy, self.enabled = policy, enabled
        # select=best starts from the starting model itself: when nothing beats it, it is what is kept
        self.score, self.at, self.state = score, 0, policy.full_state_dict() if enabled else None

    def offer(self, score: float, at: int) -> None:
        """Keep the current weights if ``score`` beats every earlier one (strictly)."""
        if self.enabled and score > self.score:
            self.score, self.at, self.state = score, at, self.policy.full_state_dict()

    def restore(self) -> None:
        self.policy.load_full_state_dict(self.state)

    def state_dict(self) -> dict:
        """What a resumed stage needs (``rlhf_cli.resume``): the best score, where it was, its weights."""
        return {"score": self.score, "at": self.at, "state": self.state}

    @classmethod
    def resumed(cls, policy, enabled: bool, saved: dict) -> KeepBest:
        """A :class:`KeepBest` as :meth:`state_dict` left it (no weights are read from ``policy``)."""
        keep = cls.__new__(cls)
        keep.policy, keep.enabled = policy, enabled
        keep.score, keep.at, keep.state = saved["score"], saved["at"], saved["state"]
        return keep


def kept_message(name: str, unit: str, best: int, metric: str, score: float) -> str:
    """What ``select=best`` kept: the best ``unit`` (iteration / epoch), or the starting model when none beat it."""
    what = metric.replace("_", " ")
    if best == 0:
        return (f"{name}: no {unit} beat the starting model on validation (greedy {what} {score:.3f}); "
                f"keeping the starting model")
    return f"{name}: keeping the checkpoint of {unit} {best} (validation greedy {what} {score:.3f})"
