"""The tool demo's settings (``--data tool-demo``): the ONE place for its tokenizer, model shape and
hyper-parameters.

They are ``benchmarks/tool_demo.py``'s, where they were chosen (docs/environments.md, "The tool
demo": a Llama of 128 x 3 layers never learned to copy the tool's result, 64 x 2 layers did), with
120 GRPO iterations instead of 60 (the CLI's seed 1 was still improving at 60): a byte-level BPE
tokenizer trained on the demonstrations (one token per digit), a Llama of 64 x 2 layers (4 heads,
MLP 256), SFT at a constant 3e-3 for 6 epochs of batches of 32, then GRPO (4 samples per prompt, no
KL term, temperature 1.0) at 3e-4 for 120 iterations of 16 prompts against the calculator
environment (2 turns of at most 20 tokens, 60 in all).
:func:`rlhf_cli.config.load_config` lays them under the user's settings when ``data.sources``
names the ``tool-demo`` source: the config file, ``key=value`` overrides and CLI options all win over
them. ``configs/tool-demo.yaml`` is the resolved config, generated from here by
``scripts/gen_config_docs.py``.
"""

from __future__ import annotations

__all__ = ["TOOL_DEMO_SETTINGS", "is_tool_demo", "with_tool_demo_defaults"]

TOOL_DEMO_SETTINGS: dict[str, object] = {
    # data: the held-out greedy episodes (before/after RL) and the validation ones
    "data.num_eval": 100,
    "data.num_valid": 50,
    # the tokenizer and the model
    "model.tokenizer_vocab_size": 320,
    "model.hidden_size": 64,
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.intermediate_size": 256,
    # SFT on the multi-turn demonstrations
    "sft.epochs": 6,
    "sft.lr": 3e-3,
    "sft.batch_size": 32,
    "sft.warmup_steps": 0,
    "sft.lr_schedule": "constant",
    "sft.weight_decay": 0.0,
    # RL: GRPO against the calculator (no reward model stage: the environment's verifier gives the reward)
    "algo.name": "grpo",
    "algo.kl_coef": 0.0,
    "algo.samples_per_prompt": 4,
    "rl.reward": "verifier",
    "rl.iterations": 120,
    "rl.rollout_batch_size": 16,
    "rl.micro_batch_size": 32,
    "rl.actor_lr": 3e-4,
    "rl.temperature": 1.0,
    "rl.max_new_tokens": 20,
    "rl.generation": "fast",
    "rl.select": "last",
    "rl.eval_every": 10,
    "env.name": "calculator",
    "env.max_turns": 2,
    "env.max_turn_tokens": 20,
    "env.max_total_tokens": 60,
}


def is_tool_demo(sources: object) -> bool:
    """Whether a data spec (``data.sources``) is the tool-demo source, with or without options."""
    return isinstance(sources, str) and sources.split("[", 1)[0].strip() == "tool-demo"


def with_tool_demo_defaults(values: dict[str, object]) -> dict[str, object]:
    """``values`` (flat dotted keys) over :data:`TOOL_DEMO_SETTINGS` when they select the tool-demo data;
    else ``values`` unchanged. An ``algo.<field>`` setting is laid under only when ``algo.name`` is the
    preset's (another algorithm may not have that field)."""
    if not is_tool_demo(values.get("data.sources")):
        return values
    algo = values.get("algo.name", TOOL_DEMO_SETTINGS["algo.name"])
    base = {k: v for k, v in TOOL_DEMO_SETTINGS.items()
            if not k.startswith("algo.") or k == "algo.name" or algo == TOOL_DEMO_SETTINGS["algo.name"]}
    return {**base, **values}
