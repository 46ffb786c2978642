"""The sections of the run configuration: one frozen dataclass each, documented and validated in one place.

Every field is documented once, in its :func:`option` help text: the same ``field.metadata["help"]``
that rlhf_algos' ``option`` writes for the algorithm configs, read back by :func:`field_help` for
``rlhf config-keys``, ``rlhf algos show``, docs/cli.md and configs/demo.yaml. Each section checks its
own fields in ``__post_init__`` and raises :class:`ConfigError` naming ``<section>.<field>``, the value
and what is allowed; :class:`rlhf_cli.config.RunConfig` only checks rules that span sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn


class ConfigError(ValueError):
    """A bad configuration value or key (the message names it and what is allowed)."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and its help text (``field.metadata["help"]``).

    The same metadata as ``rlhf_algos.base.option`` (a test keeps them equal), spelled here so that
    loading a config does not import torch.
    """
    return field(default=default, metadata={"help": help})


def field_help(cls) -> dict[str, str]:
    """``{field: help}`` of a config dataclass (a section here or an algorithm's config class)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}


def _close_names(name: str, names: Iterable[str]) -> list[str]:
    """The ``names`` closest to ``name``: by difflib's ratio, then those it extends or abbreviates (lr_rate, lr)."""
    names = list(names)
    close = difflib.get_close_matches(name, names, n=3)
    close += [n for n in names if min(len(n), len(name)) >= 2 and (n.startswith(name) or name.startswith(n))]
    return list(dict.fromkeys(close))


def did_you_mean(key: str, candidates: Iterable[str]) -> str:
    """`` (did you mean a, b?)`` naming the dotted keys closest to a mistyped ``key``; "" if none is close.

    Under a known section, its closest names (``sft.epoch`` -> ``sft.epochs``, ``rm.lr_rate`` ->
    ``rm.lr``); a right name under a wrong section, that name in every section, the closest section
    first (``rml.lr`` -> ``rm.lr, sft.lr, pref.lr``); otherwise every key with a close name.
    """
    by_section: dict[str, list[str]] = {}
    for c in candidates:
        sec, _, name = c.rpartition(".")
        by_section.setdefault(sec, []).append(name)
    if key in by_section:  # a section where a key was expected (YAML "sft: 3")
        return f" ({key} is a section: set {key}.<field>, e.g. {key}.{by_section[key][0]})"
    section, _, name = key.rpartition(".")

    def dotted(sec: str, names: Iterable[str]) -> list[str]:
        return [f"{sec}.{n}" if sec else n for n in names]

    found = dotted(section, _close_names(name, by_section.get(section, [])))
    near = difflib.get_close_matches(section, by_section, n=1) if section else []
    for sec in sorted(by_section, key=lambda sec: sec not in near):  # stable: otherwise in key order
        found += dotted(sec, [name] if name in by_section[sec] and sec != section else [])
    if not found:
        close = set(_close_names(name, {n for names in by_section.values() for n in names}))
        found = [c for sec, names in by_section.items() for c in dotted(sec, [n for n in names if n in close])]
    return f" (did you mean {', '.join(found)}?)" if found else ""


@dataclass(frozen=True)
class Section:
    """Base of the sections: checks whose :class:`ConfigError` names ``<section>.<field>``.

    ``section`` is the section's key in :class:`rlhf_cli.config.RunConfig` and in YAML; subclasses set it.
    """

    section: ClassVar[str] = ""

    def _fail(self, name: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.section}.{name}: {problem}")

    def _check_choice(self, name: str, allowed: Sequence[object]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            self._fail(name, f"{value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")

    def _check_min(self, low: float, *names: str, strict: bool = False, note: str = "") -> None:
        for name in names:
            value = getattr(self, name)
            if not (value > low if strict else value >= low):  # nan fails both comparisons
                self._fail(name, f"must be {'>' if strict else '>='} {low}{note}, got {value!r}")

    def _check_loop(self) -> None:
        """The optimiser-loop fields of the sft, rm and pref sections: epochs, batch_size, grad_accum >= 1,
        warmup_steps >= 0, lr > 0 (finiteness: every float key, rlhf_cli.config)."""
        self._check_min(1, "epochs", "batch_size", "grad_accum")
        self._check_min(0, "warmup_steps")
        self._check_min(0, "lr", strict=True)

    def _check_finite(self, *names: str) -> None:
        """Each of ``names`` is finite and >= 0."""
        for name in names:
            value = getattr(self, name)
            if not 0 <= value < math.inf:  # nan fails this comparison too
                self._fail(name, f"must be finite and >= 0, got {value!r}")


@dataclass(frozen=True)
class DataSection(Section):
    """Data."""

    section: ClassVar[str] = "data"

    sources: str = option("demo", "data spec: \"demo\" (the built-in addition task), a source name, a local file, "
                                  "or several weighted, e.g. \"hh:./hh.jsonl:0.7,shp:0.3\" (docs/data.md); in YAML "
                                  "also a list.")
    split: str = option("", "relative sizes of each source's SFT/RM/RL parts, e.g. \"2,4,4\"; \"\" = each source's "
                            "default (2,4,4 for loaded data, 4,3,3 for the demo).")
    eval_fraction: float = option(0.1, "share of prompts held out for evaluation from sources without an eval split.")
    max_eval: int = option(500, "cap on each source's held-out set.")
    sft_samples: int = option(0, "SFT samples after blending; 0 = the largest mix that repeats nothing.")
    rm_samples: int = option(0, "reward-model pairs after blending; 0 = the largest mix that repeats nothing.")
    rl_samples: int = option(0, "RL prompts after blending; 0 = the largest mix that repeats nothing.")
    max_prompt_len: int = option(64, "prompt length limit in tokens (truncation keeps the last tokens).")
    max_response_len: int = option(16, "response length limit in tokens, EOS included (truncation keeps the first).")
    truncation: str = option("truncate", "\"truncate\" or \"drop\" samples over the limits (counted in the stage "
                                         "metrics).")
    cache: bool = option(True, "cache tokenized data by content fingerprint.")
    cache_dir: str = option("", "tokenization cache; \"\" = $RLHF_CACHE_DIR/tokenized or ~/.cache/rlhf/tokenized.")
    sft_carry_error: float = option(0.7, "demo: fraction of SFT demonstrations of carry questions that forget the "
                                         "carry.")
    label_noise: float = option(0.1, "demo: fraction of preference pairs with flipped labels.")
    num_eval: int = option(300, "demo: held-out evaluation prompts.")
    num_valid: int = option(200, "demo: validation prompts (RL checkpoint selection).")
    pairs_per_prompt: int = option(4, "demo: preference pairs per reward-model prompt.")

    def __post_init__(self) -> None:
        self._check_choice("truncation", ("truncate", "drop"))
        self._check_min(1, "max_prompt_len", "max_response_len", "pairs_per_prompt")
        self._check_finite("sft_samples", "rm_samples", "rl_samples", "max_eval")
        self._check_min(1, "num_eval", "num_valid")
        for name in ("sft_carry_error", "label_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                self._fail(name, f"must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            self._fail("eval_fraction", f"must be in [0, 1), got {self.eval_fraction!r}")
        from rlhf_data import DataError, StageSplit, parse_data_spec

        try:
            parse_data_spec(self.sources)
        except DataError as e:
            raise ConfigError(f"data.sources: {e}") from None
        if self.split:
            try:
                StageSplit.parse(self.split)
            except DataError as e:
                raise ConfigError(str(e)) from None  # the message names data.split

    def demo_options(self) -> dict:
        return {"num_eval": self.num_eval, "num_valid": self.num_valid, "sft_carry_error": self.sft_carry_error,
                "label_noise": self.label_noise, "pairs_per_prompt": self.pairs_per_prompt}


@dataclass(frozen=True)
class DeepSpeedSection(Section):
    """DeepSpeed."""

    section: ClassVar[str] = "deepspeed"

    zero_stage: int = option(0, "ZeRO stage 0-3 for every trained and frozen model.")
    dtype: str = option("fp32", "fp32 or bf16 (fp16 on GPU).")
    offload_optimizer: bool = option(False, "optimizer state on the CPU (ZeRO-Offload, stage >= 1).")
    nproc: int = option(1, "processes to launch on this machine (> 1 relaunches under torchrun).")

    def __post_init__(self) -> None:
        self._check_choice("zero_stage", (0, 1, 2, 3))
        self._check_choice("dtype", ("fp32", "bf16", "fp16"))
        self._check_min(1, "nproc")
        if self.offload_optimizer and self.zero_stage == 0:
            self._fail("offload_optimizer", "needs deepspeed.zero_stage >= 1, got 0")


PADDING_FREE_HELP = ("train on the same micro-batches laid out without padding: each micro-batch's {what} packed into "
                     "rows, position ids restarting per sequence (the same loss and gradients as padded rows; "
                     "rlhf_hybrid.padding_free_layout picks rows no longer than the longest sequence for sdpa/eager "
                     "attention, one row for flash attention). Off by default: slower on the demo's short, "
                     "even-length data (docs/performance.md).")


@dataclass(frozen=True)
class SFTSection(Section):
    """Stage 1, supervised fine-tuning."""

    section: ClassVar[str] = "sft"

    epochs: int = option(20, "passes over the SFT data.")
    lr: float = option(1e-3, "AdamW learning rate.")
    batch_size: int = option(64, "per-rank micro-batch size.")
    grad_accum: int = option(1, "micro-batches per optimizer step.")
    mask_prompt: bool = option(True, "no loss on prompt tokens (completion-only training).")
    warmup_steps: int = option(20, "linear LR warm-up steps.")
    lr_schedule: str = option("cosine", "after the warm-up, \"cosine\" (decay to 10% of sft.lr over the stage, as "
                                        "rm.* and pref.*) or \"constant\".")
    weight_decay: float = option(0.1, "AdamW weight decay (decoupled, Loshchilov & Hutter 2019).")
    packing: bool = option(False, "pack several samples into each row (fewer pad tokens); attention stays within "
                                  "each sample through packed position ids (transformers 5 decoder models); "
                                  "sft.batch_size then counts rows, so a step sees more samples than unpacked.")
    padding_free: bool = option(False, PADDING_FREE_HELP.format(what="samples"))

    def __post_init__(self) -> None:
        self._check_loop()
        self._check_finite("weight_decay")
        self._check_choice("lr_schedule", ("cosine", "constant"))
        if self.padding_free and self.packing:
            self._fail("padding_free", "true together with sft.packing=true; sft.packing already packs the data into "
                                       "rows (sft.batch_size rows per step), set one of them")


@dataclass(frozen=True)
class RMSection(Section):
    """Stage 2, reward model."""

    section: ClassVar[str] = "rm"

    epochs: int = option(8, "passes over the preference pairs.")
    lr: float = option(2e-4, "AdamW peak learning rate (linear warm-up, then cosine decay to 10% over the stage).")
    batch_size: int = option(32, "per-rank pairs per micro-batch.")
    grad_accum: int = option(1, "micro-batches per optimizer step.")
    center_coef: float = option(0.01, "weight of the centring term (r_c + r_r)^2 that keeps scores comparable across "
                                      "prompts (a pairwise-only loss learns per-prompt offsets).")
    warmup_steps: int = option(20, "linear LR warm-up steps.")
    padding_free: bool = option(False, PADDING_FREE_HELP.format(what="pairs"))

    def __post_init__(self) -> None:
        self._check_loop()
        self._check_finite("center_coef")


def registered_algorithm(name: str):
    """The class registered under ``name`` (ConfigError naming algo.name and the available ones if none)."""
    from rlhf_algos import get_algorithm

    try:
        return get_algorithm(name)
    except ValueError as e:
        raise ConfigError(f"algo.name: {e}") from None


@dataclass(frozen=True)
class AlgoSection(Section):
    """The stage-3 algorithm."""

    section: ClassVar[str] = "algo"

    name: str = option("ppo", "a name registered under the entry-point group rlhf.algorithms (`rlhf algos list`): "
                              "online RL (ppo, grpo, dr_grpo, rloo, reinforce_pp, remax) or preference optimisation "
                              "(dpo, ipo, cdpo, simpo, orpo, kto). Its own hyper-parameters are set as algo.<field> "
                              "(`rlhf algos show <name>`).")
    # algo.<field>=value settings of the chosen algorithm's config class, as (field, value) pairs;
    # documented by that class (`rlhf algos show <name>`), not listed by `rlhf config-keys`.
    options: tuple = field(default=(), metadata={"dynamic": True})

    def __post_init__(self) -> None:
        cls = self.algorithm()
        shared = RLSection.shared_with(cls)
        settings = sorted({f.name for f in dataclasses.fields(cls.config_class)} - set(shared))
        for key, _ in self.options:
            if key in shared:
                self._fail(key, f"set rl.{shared[key]} instead (shared by every online algorithm)")
            if key not in settings:
                hint = did_you_mean(f"algo.{key}", [f"algo.{s}" for s in ("name", *settings)])
                self._fail(key, f"{self.name!r} has no setting {key!r}{hint}; its settings: {', '.join(settings)} "
                                f"(`rlhf algos show {self.name}`)")

    def algorithm(self):
        """The class registered as ``algo.name``: an online or offline (stage-3) algorithm."""
        cls = registered_algorithm(self.name)
        if cls.kind not in ("online", "offline"):  # sft and rm are stages 1 and 2, run by --stage sft / rm
            raise ConfigError(f"algo.name: {self.name!r} is a {cls.kind} algorithm, not a stage-3 one (--stage sft "
                              f"and --stage rm run stages 1 and 2); allowed: an online or offline algorithm "
                              f"(`rlhf algos list`)")
        return cls

    def option_dict(self) -> dict:
        return dict(self.options)


@dataclass(frozen=True)
class RLSection(Section):
    """Stage 3 with an online algorithm (ppo, grpo, rloo, ...): the loop around it."""

    section: ClassVar[str] = "rl"

    iterations: int = option(60, "rollout/learn iterations.")
    rollout_batch_size: int = option(128, "prompts per rank per iteration (each answered algo.samples_per_prompt "
                                          "times).")
    micro_batch_size: int = option(64, "rows per forward/backward when learning.")
    epochs: int = option(1, "passes over each rollout.")
    actor_lr: float = option(1e-4, "actor learning rate.")
    critic_lr: float = option(5e-4, "critic learning rate (algorithms with a critic).")
    max_new_tokens: int = option(8, "response length limit when sampling.")
    temperature: float = option(1.0, "sampling temperature (also used for the \"sampled\" evaluation).")
    reward: str = option("model", "\"model\" (the trained reward model), \"verifier\" (the data's ground truth: the "
                                  "demo), or a reward function registered under the entry-point group rlhf.rewards "
                                  "(e.g. \"addition\").")
    eval_every: int = option(5, "iterations between validation evaluations (checkpoint selection).")
    select: str = option("best", "\"best\" keeps the checkpoint with the best validation score, \"last\" the final "
                                 "one.")
    generation: str = option("hf", "\"hf\" (transformers generate) or \"fast\" (rlhf-hybrid's inference layout with a "
                                   "KV cache over rlhf-kernels ops; Llama/Mistral/Qwen2, OPT, GPT-2; other models fall "
                                   "back to hf with a warning).")
    inference_tp_size: int = option(1, "with generation=fast, split the generation layout's heads and MLP over this "
                                       "many consecutive ranks (tensor parallelism in generate mode only; training "
                                       "stays data-parallel).")
    cuda_graphs: bool = option(True, "with generation=fast on a CUDA GPU, replay the decode step from CUDA graphs (one "
                                     "per batch size bucket, captured once per rollout); false: eager decode steps.")
    keep_decode_cache: bool = option(False, "with generation=fast under deepspeed.zero_stage 0-2, keep the KV cache and "
                                            "CUDA graphs allocated between rollouts (no recapture; training then runs "
                                            "without that memory).")
    gather_quantization: str = option(
        "none", "with generation=fast and deepspeed.zero_stage=3, how the actor's shards travel when gathered for a "
        "rollout (one all-gather per layer): \"none\" (exact), \"int8\" or \"int4\" (blockwise quantized on the wire, "
        "ZeRO++ style; generation then samples from weights within half a quantization step of the trained ones).")
    ema_beta: float = option(0.0, "keep an exponential moving average of the actor, updated after every optimizer step "
                                  "(ema = beta * ema + (1 - beta) * weights; DeepSpeed-Chat's --enable_ema uses "
                                  "0.992), saved as <out>/<algo>_ema and scored on the held-out prompts too; 0 = off.")
    padding_free: bool = option(False, "the learn step's actor and critic forwards on each rollout row's real tokens "
                                       "packed into rows, position ids restarting per sequence (generation and the "
                                       "rollout's scoring stay padded; the same losses and gradients; "
                                       "rlhf_hybrid.padding_free_layout picks rows no longer than the longest "
                                       "sequence for sdpa/eager attention, one row for flash attention). Online "
                                       "algorithms only. Off by default (docs/performance.md).")
    ptx_coef: float = option(0.0, "weight of the ptx term: the SFT loss (as stage 1's, sft.mask_prompt) on a batch of "
                                  "rl.micro_batch_size demonstrations from the SFT split, drawn for every actor step "
                                  "and added to its loss (InstructGPT's PPO-ptx, DeepSpeed-Chat's unsupervised loss; "
                                  "docs/pipeline.md, \"The ptx term\"); 0 = off.")
    health_window: int = option(15, "RL health warnings: iterations before \"reward flat while the KL rises\" is "
                                    "first judged, from then on over every iteration since the first (>= 2; "
                                    "docs/pipeline.md, rlhf_algos.HealthMonitor).")
    flat_reward_tol: float = option(0.1, "RL health: the reward counts as flat when its least-squares rise since the "
                                         "first iteration is at most this fraction of the mean reward_std.")
    kl_rise_tol: float = option(0.25, "RL health: the KL to the reference counts as rising when its least-squares rise "
                                      "since the first iteration exceeds this fraction of its mean there (and "
                                      "rl.kl_rise_min).")
    kl_rise_min: float = option(0.01, "RL health: the KL to the reference counts as rising only when its least-squares "
                                      "rise since the first iteration exceeds this many nats per sequence (and "
                                      "rl.kl_rise_tol of its mean).")
    entropy_floor: float = option(0.05, "RL health: warn of entropy collapse below this mean entropy (nats/token).")
    entropy_drop: float = option(0.8, "RL health: also warn of entropy collapse when the entropy fell by more than "
                                      "this fraction of the first iteration's, in (0, 1].")
    gen_kl_threshold: float = option(1e-3, "RL health: warn when gen_kl_error (the k3 KL between the generator's "
                                           "log-probs and the training forward's, same weights) exceeds this.")

    # rl.<key> -> rlhf_algos.HealthThresholds field; the defaults above equal that class's
    # (tests/test_cli_health.py checks it) and HealthThresholds is the one place that validates them.
    HEALTH_KEYS: ClassVar[dict[str, str]] = {
        "health_window": "window", "flat_reward_tol": "flat_reward_tol", "kl_rise_tol": "kl_rise_tol",
        "kl_rise_min": "kl_rise_min", "entropy_floor": "entropy_floor", "entropy_drop": "entropy_drop",
        "gen_kl_threshold": "gen_kl_threshold",
    }
    # online algorithm config field -> rl.<key>: the loop settings every online algorithm takes from the
    # run (set as rl.<key>, never as algo.<field>)
    ALGO_KEYS: ClassVar[dict[str, str]] = {
        "micro_batch_size": "micro_batch_size", "ppo_epochs": "epochs", "max_new_tokens": "max_new_tokens",
        "temperature": "temperature", "ptx_coef": "ptx_coef", "batch_layout": "padding_free",
    }

    def __post_init__(self) -> None:
        self._check_min(1, "iterations", "rollout_batch_size", "micro_batch_size", "epochs", "max_new_tokens",
                        "eval_every", "inference_tp_size")
        self._check_min(0, "actor_lr", "critic_lr", "temperature", strict=True)
        self._check_choice("select", ("best", "last"))
        self._check_choice("generation", ("hf", "fast"))
        if not 0.0 <= self.ema_beta < 1.0:  # nan fails this comparison too
            self._fail("ema_beta", f"must be in [0, 1) (0 = off), got {self.ema_beta!r}")
        self._check_choice("gather_quantization", ("none", "int8", "int4"))
        self._check_finite("ptx_coef")
        self.health_thresholds()
        if self.inference_tp_size > 1 and self.generation != "fast":
            self._fail("inference_tp_size", f"{self.inference_tp_size} needs rl.generation=fast, got "
                                            f"rl.generation={self.generation!r}")
        if self.reward not in ("model", "verifier"):
            from rlhf_algos import available_rewards

            if self.reward not in available_rewards():
                allowed = ", ".join(map(repr, ["model", "verifier", *sorted(available_rewards())]))
                self._fail("reward", f"{self.reward!r} is not allowed; allowed: {allowed} (reward functions register "
                                     f"under the entry-point group 'rlhf.rewards')")

    def health_thresholds(self):
        """The ``rlhf_algos.HealthThresholds`` of the rl.* health keys (ConfigError naming the rl.* key)."""
        from rlhf_algos import HealthThresholds

        try:
            return HealthThresholds(**{field: getattr(self, key) for key, field in self.HEALTH_KEYS.items()})
        except ValueError as e:
            field, _, rest = str(e).partition(": ")
            key = next(k for k, f in self.HEALTH_KEYS.items() if f == field)
            raise ConfigError(f"rl.{key}: {rest}") from None

    @classmethod
    def shared_with(cls, algorithm) -> dict[str, str]:
        """``{config field: rl key}`` of the loop settings ``algorithm`` (a registered class) takes from rl.*."""
        if algorithm.kind != "online":
            return {}
        names = {f.name for f in dataclasses.fields(algorithm.config_class)}
        return {f: key for f, key in cls.ALGO_KEYS.items() if f in names}

    def algorithm_values(self, algorithm, padding_free_layout: str = "rows") -> dict[str, object]:
        """``{config field: value}`` of the rl.* settings ``algorithm`` takes (:meth:`shared_with`);
        rl.padding_free (a bool) becomes ``batch_layout``: ``padding_free_layout`` when true, else "padded"."""
        out = {f: getattr(self, key) for f, key in self.shared_with(algorithm).items()}
        if "batch_layout" in out:
            out["batch_layout"] = padding_free_layout if self.padding_free else "padded"
        return out


@dataclass(frozen=True)
class PrefSection(Section):
    """Stage 3 with preference optimisation (dpo, ipo, cdpo, simpo, orpo, kto) on the reward-model pairs."""

    section: ClassVar[str] = "pref"

    epochs: int = option(2, "passes over the preference pairs.")
    lr: float = option(5e-5, "AdamW peak learning rate (linear warm-up, then cosine decay to 10% over the stage).")
    batch_size: int = option(32, "per-rank pairs per micro-batch.")
    grad_accum: int = option(1, "micro-batches per optimizer step.")
    warmup_steps: int = option(20, "linear LR warm-up steps.")
    select: str = option("best", "\"best\" keeps the epoch with the best validation score (when the data has a "
                                 "verifier or a reward model was trained), \"last\" the final one.")

    def __post_init__(self) -> None:
        self._check_loop()
        self._check_choice("select", ("best", "last"))


@dataclass(frozen=True)
class LoRASection(Section):
    """LoRA: low-rank adapters on the trained policy, the rest of it frozen (DeepSpeed-Chat's
    --actor_lora_dim / --actor_lora_module_name / --only_optimize_lora; TRL's peft LoraConfig)."""

    section: ClassVar[str] = "lora"

    rank: int = option(0, "adapter rank r (DeepSpeed-Chat --actor_lora_dim, peft r); 0 = off: every weight trains.")
    alpha: float = option(16.0, "the update is (alpha / rank) B A (peft lora_alpha).")
    # rlhf_hybrid.lora.DEFAULT_TARGETS, spelled out: importing rlhf_hybrid (torch) here would slow every
    # `rlhf` command (a test checks that the two agree)
    targets: str = option("q_proj,k_proj,v_proj,o_proj,out_proj,gate_proj,up_proj,down_proj,fc1,fc2",
                          "comma-separated names of the linear layers that get adapters (peft target_modules, "
                          "DeepSpeed-Chat --actor_lora_module_name); every other weight is frozen "
                          "(--only_optimize_lora). The default covers the Llama-style and OPT layer names; a name "
                          "given here must match a layer.")
    stages: str = option("sft,rl,pref", "comma-separated stages whose trained policy gets adapters: sft, rl (the "
                                        "online algorithms' actor), pref (the preference-optimisation policy). Saved "
                                        "checkpoints hold the adapters fused into plain weights, so the next stage "
                                        "starts from a plain model.")

    STAGES: ClassVar[tuple[str, ...]] = ("sft", "rl", "pref")

    def __post_init__(self) -> None:
        self._check_min(0, "rank", note=" (0 = no LoRA)")
        self._check_min(0, "alpha", strict=True)
        if not self.target_list() or not all(t.isidentifier() for t in self.target_list()):
            self._fail("targets", f"{self.targets!r} is not allowed; allowed: a comma-separated list of layer "
                                  f"attribute names, e.g. 'q_proj,v_proj'")
        if not self.stage_list() or not all(s in self.STAGES for s in self.stage_list()):
            self._fail("stages", f"{self.stages!r} is not allowed; allowed: a comma-separated list of "
                                 f"{', '.join(map(repr, self.STAGES))}")

    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def stage_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.stages.split(",") if t.strip())

    def applies_to(self, stage: str) -> bool:
        """Whether the policy trained in ``stage`` ("sft", "rl" or "pref") gets adapters."""
        return self.rank > 0 and stage in self.stage_list()
