"""The online stage against an environment (``env.name``, docs/environments.md): the checks before a run,
the rollout attached to the algorithm (``rlhf_algos.multiturn.EnvRollout``) and the held-out greedy
episodes that judge the policy (:class:`EnvEvaluator`, in place of :class:`rlhf_cli.evaluation.Evaluator`).

On the tool demo (``--data tool-demo``) the episodes are scored by ``rlhf_data.tool_demo.tool_use_stats``
(verifier score, tool-call rate, copy-error rate); with another environment by the mean final reward
of the episodes (``env_score``). Each held-out evaluation's episodes are written to
``<out>/<algo>/eval_episodes_<before|after>.jsonl``.
"""

from __future__ import annotations

import json
import os

from .context import Context, PipelineError, tokenized
from .tool_demo_preset import is_tool_demo

__all__ = ["EnvEvaluator", "check_env_run", "env_rollout"]


def check_env_run(ctx: Context, data, stages: list[str], algo_cls) -> None:
    """Before any stage runs: the environment settings fit the data and the stages (PipelineError naming
    them otherwise); on the tool demo, say which stages ``--stage all`` runs."""
    cfg = ctx.cfg
    env, tool_demo = cfg.env.name, is_tool_demo(cfg.data.sources)
    if tool_demo and "rm" in stages:
        raise PipelineError(f"--stage rm: the tool demo (data.sources={cfg.data.sources!r}) has no reward-model "
                            f"stage: the {env or 'calculator'} environment's verifier gives the reward; run "
                            f"--stage all (sft -> {algo_cls.name}), --stage sft or --stage {algo_cls.name}")
    if algo_cls.name not in stages:
        return
    if tool_demo and not env:
        raise PipelineError(f"env.name: the tool demo (data.sources={cfg.data.sources!r}) rolls out against an "
                            f"environment; env.name='' is not allowed for it; use env.name=calculator")
    if not env:
        return
    if data.verifier is None:
        raise PipelineError(f"env.name: {env!r} needs data with a ground-truth verifier (--data demo or tool-demo); "
                            f"data.sources={cfg.data.sources!r} has none")
    from rlhf_algos.base import OnlineAlgorithm

    if algo_cls.baseline_scores is not OnlineAlgorithm.baseline_scores and not algo_cls.env_baseline:
        raise PipelineError(f"env.name: {env!r} is not supported with algo.name={algo_cls.name!r}: its baseline "
                            f"(baseline_scores) is a single-turn rollout (it does not declare env_baseline)")
    if cfg.rl.ptx_coef > 0 and tool_demo:
        raise PipelineError(f"rl.ptx_coef: {cfg.rl.ptx_coef} is not supported on the tool demo (its SFT "
                            f"demonstrations are multi-turn); use rl.ptx_coef=0")
    if tool_demo and stages[0] == "sft" and ctx.is_main:
        ctx.reporter.print(f"tool demo: running {' -> '.join(stages)}; no reward-model stage (the {env} "
                           f"environment's verifier gives the reward)")


def _codec(tokenizer):
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    return decode, encode


def env_rollout(ctx: Context, tokenizer):
    """The ``rlhf_algos.multiturn.EnvRollout`` of ``env.*``: a fresh registered environment per trajectory."""
    from rlhf_algos.multiturn import EnvRollout

    decode, encode = _codec(tokenizer)
    return EnvRollout(ctx.cfg.env.environment(), ctx.cfg.env.budget(), decode=decode, encode=encode,
                      vocab_size=len(tokenizer))


class EnvEvaluator:
    """Held-out and validation greedy episodes of the policy being trained against ``env.name``.

    The interface of :class:`rlhf_cli.evaluation.Evaluator`: ``metric``, ``stats``, :meth:`held_out`,
    :meth:`validate`.
    """

    def __init__(self, ctx: Context, tokenizer, data, actor) -> None:
        from rlhf_hybrid import all_reduce_mean

        stats: dict = {}
        self.valid_prompts = tokenized(ctx, tokenizer, data.rl_valid, "rl", "rl validation", stats)
        self.eval_prompts = tokenized(ctx, tokenizer, data.rl_eval, "rl", "rl held-out", stats)
        self.ctx, self.tokenizer, self.actor, self.stats = ctx, tokenizer, actor, stats
        self.tool_demo = is_tool_demo(ctx.cfg.data.sources)
        self.metric = "verifier_score" if self.tool_demo else "env_score"
        self.all_reduce_mean = all_reduce_mean

    def episodes(self, prompts: list[dict], batch: int = 256) -> list[dict]:
        """Greedy episodes of ``prompts``: one dict per episode (its prompt, turns, score, end reason, the last
        step's info)."""
        from rlhf_data import collate_prompts

        tok, rollout, out = self.tokenizer, env_rollout(self.ctx, self.tokenizer), []
        self.actor.eval()
        for i in range(0, len(prompts), batch):
            b = collate_prompts(prompts[i : i + batch], tok.pad_token_id)
            tb = rollout.episodes(self.actor, b["input_ids"], b["attention_mask"], b["meta"],
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False)
            out += [_episode_row(tb, j, m) for j, m in enumerate(b["meta"])]
        self.actor.train()
        return out

    def score(self, episodes: list[dict]) -> dict[str, float]:
        """The tool demo's rates (``rlhf_data.tool_demo.tool_use_stats``), else ``env_score``; and the mean turns."""
        if self.tool_demo:
            from rlhf_data.tool_demo import tool_use_stats

            out = tool_use_stats([e["final_info"] for e in episodes])
        else:
            out = {"env_score": sum(e["score"] for e in episodes) / max(len(episodes), 1)}
        return out | {"env_turns_mean": sum(e["num_turns"] for e in episodes) / max(len(episodes), 1)}

    def held_out(self, tag: str) -> dict:
        """The held-out greedy episodes' scores, keys suffixed ``_tag``; the episodes go to
        ``<out>/<algo>/eval_episodes_<tag>.jsonl`` (carried into the saved stage)."""
        episodes = self.episodes(self.eval_prompts)
        if self.ctx.is_main:
            d = self.ctx.stage_dir(self.ctx.cfg.algo.name)
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".eval_episodes_{tag}.jsonl.tmp-{os.getpid()}"
            tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in episodes))
            os.replace(tmp, d / f"eval_episodes_{tag}.jsonl")
        out = {f"{k}_{tag}": v for k, v in self.score(episodes).items()}
        return out | {f"kl_to_ref_{tag}": None}

    def validate(self) -> float:
        """The greedy score on the validation prompts (checkpoint selection), averaged over ranks."""
        score = self.score(self.episodes(self.valid_prompts))[self.metric]
        return self.all_reduce_mean({"valid": score})["valid"]


def _episode_row(tb, j: int, meta: dict) -> dict:
    """Episode ``j`` of a ``TrajectoryBatch``: its turns as ``[role, ids]`` runs of the loss mask."""
    P = tb.prompt_len
    prompt = tb.sequences[j, :P][tb.attention_mask[j, :P].bool()].tolist()
    n = int(tb.attention_mask[j, P:].sum())
    ids, model = tb.sequences[j, P : P + n].tolist(), tb.loss_mask[j, :n].bool().tolist()
    turns: list[list] = []
    for t, m in zip(ids, model, strict=True):
        role = "model" if m else "env"
        if not turns or turns[-1][0] != role:
            turns.append([role, []])
        turns[-1][1].append(t)
    return {"meta": meta, "prompt_ids": prompt, "turns": turns, "score": float(tb.scores[j]),
            "num_turns": int(tb.num_turns[j]), "end_reason": tb.end_reasons[j], "final_info": tb.final_info[j]}
