"""The run configuration: frozen dataclasses, loaded from YAML plus ``key=value`` overrides.

Every field is documented once, here; ``rlhf run --help`` and the key table in docs/cli.md derive from it.
Unknown keys and malformed values raise :class:`ConfigError` naming the key, the value and what is
allowed; nothing is silently rewritten.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration value or key (the message names it and what is allowed)."""


@dataclass(frozen=True)
class ModelSection:
    """Models.

    Attributes:
        actor_model: HF hub name or local directory of a causal LM; "" = the demo's tiny Llama.
        reward_model: HF hub name or local directory for the reward model and critic (a fresh value
            head is added); "" = start them from the SFT model.
        hidden_size: tiny demo model: hidden width.
        num_layers: tiny demo model: transformer layers.
        num_heads: tiny demo model: attention heads.
        intermediate_size: tiny demo model: MLP width.
        tokenizer_vocab_size: tiny demo model: vocabulary of the byte-level BPE tokenizer trained on the
            data in-process; 0 = 320 for the demo task, 2048 for other data.
    """

    actor_model: str = ""
    reward_model: str = ""
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 8
    intermediate_size: int = 1024
    tokenizer_vocab_size: int = 0


@dataclass(frozen=True)
class DataSection:
    """Data.

    Attributes:
        sources: data spec: "demo" (the built-in addition task), a source name, a local file, or several
            weighted, e.g. "hh:./hh.jsonl:0.7,shp:0.3" (docs/data.md); in YAML also a list.
        split: relative sizes of each source's SFT/RM/RL parts, e.g. "2,4,4"; "" = each source's default
            (2,4,4 for loaded data, 4,3,3 for the demo).
        eval_fraction: share of prompts held out for evaluation from sources without an eval split.
        max_eval: cap on each source's held-out set.
        sft_samples: SFT samples after blending; 0 = the largest mix that repeats nothing.
        rm_samples: reward-model pairs after blending; 0 = the largest mix that repeats nothing.
        rl_samples: RL prompts after blending; 0 = the largest mix that repeats nothing.
        max_prompt_len: prompt length limit in tokens (truncation keeps the last tokens).
        max_response_len: response length limit in tokens, EOS included (truncation keeps the first).
        truncation: "truncate" or "drop" samples over the limits (counted in the stage metrics).
        cache: cache tokenized data by content fingerprint.
        cache_dir: tokenization cache; "" = $RLHF_CACHE_DIR/tokenized or ~/.cache/rlhf/tokenized.
        sft_carry_error: demo: fraction of SFT demonstrations of carry questions that forget the carry.
        label_noise: demo: fraction of preference pairs with flipped labels.
        num_eval: demo: held-out evaluation prompts.
        num_valid: demo: validation prompts (RL checkpoint selection).
        pairs_per_prompt: demo: preference pairs per reward-model prompt.
    """

    sources: str = "demo"
    split: str = ""
    eval_fraction: float = 0.1
    max_eval: int = 500
    sft_samples: int = 0
    rm_samples: int = 0
    rl_samples: int = 0
    max_prompt_len: int = 64
    max_response_len: int = 16
    truncation: str = "truncate"
    cache: bool = True
    cache_dir: str = ""
    sft_carry_error: float = 0.7
    label_noise: float = 0.1
    num_eval: int = 300
    num_valid: int = 200
    pairs_per_prompt: int = 4

    def demo_options(self) -> dict:
        return {"num_eval": self.num_eval, "num_valid": self.num_valid, "sft_carry_error": self.sft_carry_error,
                "label_noise": self.label_noise, "pairs_per_prompt": self.pairs_per_prompt}


@dataclass(frozen=True)
class DeepSpeedSection:
    """DeepSpeed.

    Attributes:
        zero_stage: ZeRO stage 0-3 for every trained and frozen model.
        dtype: fp32 or bf16 (fp16 on GPU).
        offload_optimizer: optimizer state on the CPU (ZeRO-Offload, stage >= 1).
        nproc: processes to launch on this machine (> 1 relaunches under torchrun).
    """

    zero_stage: int = 0
    dtype: str = "fp32"
    offload_optimizer: bool = False
    nproc: int = 1


@dataclass(frozen=True)
class SFTSection:
    """Stage 1, supervised fine-tuning.

    Attributes:
        epochs: passes over the SFT data.
        lr: AdamW learning rate.
        batch_size: per-rank micro-batch size.
        grad_accum: micro-batches per optimizer step.
        mask_prompt: no loss on prompt tokens (completion-only training).
        warmup_steps: linear LR warm-up steps.
        lr_schedule: after the warm-up, "cosine" (decay to 10% of sft.lr over the stage, as rm.* and pref.*)
            or "constant".
        weight_decay: AdamW weight decay (decoupled, Loshchilov & Hutter 2019).
        packing: pack several samples into each row (fewer pad tokens); attention stays within each sample
            through packed position ids (transformers 5 decoder models).
    """

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    grad_accum: int = 1
    mask_prompt: bool = True
    warmup_steps: int = 20
    lr_schedule: str = "cosine"
    weight_decay: float = 0.1
    packing: bool = False


@dataclass(frozen=True)
class RMSection:
    """Stage 2, reward model.

    Attributes:
        epochs: passes over the preference pairs.
        lr: AdamW peak learning rate (linear warm-up, then cosine decay to 10% over the stage).
        batch_size: per-rank pairs per micro-batch.
        grad_accum: micro-batches per optimizer step.
        center_coef: weight of the centring term (r_c + r_r)^2 that keeps scores comparable across
            prompts (a pairwise-only loss learns per-prompt offsets).
        warmup_steps: linear LR warm-up steps.
    """

    epochs: int = 8
    lr: float = 2e-4
    batch_size: int = 32
    grad_accum: int = 1
    center_coef: float = 0.01
    warmup_steps: int = 20


@dataclass(frozen=True)
class AlgoSection:
    """The stage-3 algorithm.

    Attributes:
        name: a name registered under the entry-point group rlhf.algorithms (`rlhf algos list`): online RL
            (ppo, grpo, dr_grpo, rloo, reinforce_pp, remax) or preference optimisation (dpo, ipo, cdpo, simpo,
            orpo, kto). Its own hyper-parameters are set as algo.<field> (`rlhf algos show <name>`).
    """

    name: str = "ppo"
    # algo.<field>=value settings of the chosen algorithm's config class, as (field, value) pairs;
    # checked against that class when the config is built (not listed by `rlhf config-keys`).
    options: tuple = field(default=(), metadata={"dynamic": True})

    def option_dict(self) -> dict:
        return dict(self.options)


@dataclass(frozen=True)
class RLSection:
    """Stage 3 with an online algorithm (ppo, grpo, rloo, ...): the loop around it.

    Attributes:
        iterations: rollout/learn iterations.
        rollout_batch_size: prompts per rank per iteration (each answered algo.samples_per_prompt times).
        micro_batch_size: rows per forward/backward when learning.
        epochs: passes over each rollout.
        actor_lr: actor learning rate.
        critic_lr: critic learning rate (algorithms with a critic).
        max_new_tokens: response length limit when sampling.
        temperature: sampling temperature (also used for the "sampled" evaluation).
        reward: "model" (the trained reward model), "verifier" (the data's ground truth: the demo), or a
            reward function registered under the entry-point group rlhf.rewards (e.g. "addition").
        eval_every: iterations between validation evaluations (checkpoint selection).
        select: "best" keeps the checkpoint with the best validation score, "last" the final one.
        generation: "hf" (transformers generate) or "fast" (rlhf-hybrid's inference layout with a KV cache over
            rlhf-kernels ops; Llama/Mistral/Qwen2, OPT, GPT-2; other models fall back to hf with a warning).
        inference_tp_size: with generation=fast, split the generation layout's heads and MLP over this many
            consecutive ranks (tensor parallelism in generate mode only; training stays data-parallel).
        cuda_graphs: with generation=fast on a CUDA GPU, replay the decode step from CUDA graphs (one per batch
            size bucket, captured once per rollout); false: eager decode steps.
        keep_decode_cache: with generation=fast under deepspeed.zero_stage 0-2, keep the KV cache and CUDA graphs
            allocated between rollouts (no recapture; training then runs without that memory).
        gather_quantization: with generation=fast and deepspeed.zero_stage=3, how the actor's shards travel when
            gathered for a rollout (one all-gather per layer): "none" (exact), "int8" or "int4" (blockwise
            quantized on the wire, ZeRO++ style; generation then samples from weights within half a quantization
            step of the trained ones).
        health_window: RL health warnings: iterations before "reward flat while the KL rises" is first
            judged, from then on over every iteration since the first (>= 2; docs/pipeline.md,
            rlhf_algos.HealthMonitor).
        flat_reward_tol: RL health: the reward counts as flat when its least-squares rise since the first
            iteration is at most this fraction of the mean reward_std.
        kl_rise_tol: RL health: the KL to the reference counts as rising when its least-squares rise since
            the first iteration exceeds this fraction of its mean there (and rl.kl_rise_min).
        kl_rise_min: RL health: the KL to the reference counts as rising only when its least-squares rise
            since the first iteration exceeds this many nats per sequence (and rl.kl_rise_tol of its mean).
        entropy_floor: RL health: warn of entropy collapse below this mean entropy (nats/token).
        entropy_drop: RL health: also warn of entropy collapse when the entropy fell by more than this fraction
            of the first iteration's, in (0, 1].
        gen_kl_threshold: RL health: warn when gen_kl_error (the k3 KL between the generator's log-probs and the
            training forward's, same weights) exceeds this.
    """

    iterations: int = 60
    rollout_batch_size: int = 128
    micro_batch_size: int = 64
    epochs: int = 1
    actor_lr: float = 1e-4
    critic_lr: float = 5e-4
    max_new_tokens: int = 8
    temperature: float = 1.0
    reward: str = "model"
    eval_every: int = 5
    select: str = "best"
    generation: str = "hf"
    inference_tp_size: int = 1
    cuda_graphs: bool = True
    keep_decode_cache: bool = False
    gather_quantization: str = "none"
    health_window: int = 15
    flat_reward_tol: float = 0.1
    kl_rise_tol: float = 0.25
    kl_rise_min: float = 0.01
    entropy_floor: float = 0.05
    entropy_drop: float = 0.8
    gen_kl_threshold: float = 1e-3

    # rl.<key> -> rlhf_algos.HealthThresholds field; the defaults above equal that class's
    # (tests/test_cli_health.py checks it) and HealthThresholds is the one place that validates them.
    HEALTH_KEYS: typing.ClassVar[dict[str, str]] = {
        "health_window": "window", "flat_reward_tol": "flat_reward_tol", "kl_rise_tol": "kl_rise_tol",
        "kl_rise_min": "kl_rise_min", "entropy_floor": "entropy_floor", "entropy_drop": "entropy_drop",
        "gen_kl_threshold": "gen_kl_threshold",
    }

    def health_thresholds(self):
        """The ``rlhf_algos.HealthThresholds`` of the rl.* health keys (ConfigError naming the rl.* key)."""
        from rlhf_algos import HealthThresholds

        try:
            return HealthThresholds(**{field: getattr(self, key) for key, field in self.HEALTH_KEYS.items()})
        except ValueError as e:
            field, _, rest = str(e).partition(": ")
            key = next(k for k, f in self.HEALTH_KEYS.items() if f == field)
            raise ConfigError(f"rl.{key}: {rest}") from None


@dataclass(frozen=True)
class PrefSection:
    """Stage 3 with preference optimisation (dpo, ipo, cdpo, simpo, orpo, kto) on the reward-model pairs.

    Attributes:
        epochs: passes over the preference pairs.
        lr: AdamW peak learning rate (linear warm-up, then cosine decay to 10% over the stage).
        batch_size: per-rank pairs per micro-batch.
        grad_accum: micro-batches per optimizer step.
        warmup_steps: linear LR warm-up steps.
        select: "best" keeps the epoch with the best validation score (when the data has a verifier or a
            reward model was trained), "last" the final one.
    """

    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 32
    grad_accum: int = 1
    warmup_steps: int = 20
    select: str = "best"


@dataclass(frozen=True)
class LoRASection:
    """LoRA: low-rank adapters on the trained policy, the rest of it frozen (DeepSpeed-Chat's
    --actor_lora_dim / --actor_lora_module_name / --only_optimize_lora; TRL's peft LoraConfig).

    Attributes:
        rank: adapter rank r (DeepSpeed-Chat --actor_lora_dim, peft r); 0 = off: every weight trains.
        alpha: the update is (alpha / rank) B A (peft lora_alpha).
        targets: comma-separated names of the linear layers that get adapters (peft target_modules,
            DeepSpeed-Chat --actor_lora_module_name); every other weight is frozen (--only_optimize_lora).
            The default covers the Llama-style and OPT layer names; a name given here must match a layer.
        stages: comma-separated stages whose trained policy gets adapters: sft, rl (the online algorithms'
            actor), pref (the preference-optimisation policy). Saved checkpoints hold the adapters fused
            into plain weights, so the next stage starts from a plain model.
    """

    rank: int = 0
    alpha: float = 16.0
    # rlhf_hybrid.lora.DEFAULT_TARGETS, spelled out: importing rlhf_hybrid (torch) here would slow every
    # `rlhf` command (a test checks that the two agree)
    targets: str = "q_proj,k_proj,v_proj,o_proj,out_proj,gate_proj,up_proj,down_proj,fc1,fc2"
    stages: str = "sft,rl,pref"

    STAGES: typing.ClassVar[tuple[str, ...]] = ("sft", "rl", "pref")

    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def stage_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.stages.split(",") if t.strip())

    def applies_to(self, stage: str) -> bool:
        """Whether the policy trained in ``stage`` ("sft", "rl" or "pref") gets adapters."""
        return self.rank > 0 and stage in self.stage_list()


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``rlhf run`` needs.

    Attributes:
        out: output directory (``<out>/sft``, ``<out>/rm``, ``<out>/<algo>``, ``<out>/summary.json``).
        seed: global seed.
    """

    out: str = "rlhf-out"
    seed: int = 42
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    sft: SFTSection = field(default_factory=SFTSection)
    rm: RMSection = field(default_factory=RMSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    rl: RLSection = field(default_factory=RLSection)
    pref: PrefSection = field(default_factory=PrefSection)
    lora: LoRASection = field(default_factory=LoRASection)

    def __post_init__(self) -> None:
        checks = [
            ("data.truncation", self.data.truncation, ("truncate", "drop")),
            ("deepspeed.zero_stage", self.deepspeed.zero_stage, (0, 1, 2, 3)),
            ("deepspeed.dtype", self.deepspeed.dtype, ("fp32", "bf16", "fp16")),
            ("rl.select", self.rl.select, ("best", "last")),
            ("rl.generation", self.rl.generation, ("hf", "fast")),
            ("rl.gather_quantization", self.rl.gather_quantization, ("none", "int8", "int4")),
            ("pref.select", self.pref.select, ("best", "last")),
            ("sft.lr_schedule", self.sft.lr_schedule, ("cosine", "constant")),
        ]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")
        positive = ["deepspeed.nproc", "sft.epochs", "sft.batch_size", "sft.grad_accum", "rm.epochs",
                    "rm.batch_size", "rm.grad_accum", "rl.iterations", "rl.rollout_batch_size",
                    "rl.micro_batch_size", "rl.epochs", "rl.max_new_tokens", "rl.eval_every",
                    "pref.epochs", "pref.batch_size", "pref.grad_accum", "rl.inference_tp_size",
                    "data.max_prompt_len", "data.max_response_len", "data.pairs_per_prompt"]
        for key in positive:
            value = get_key(self, key)
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value!r}")
        for key in ("sft.lr", "rm.lr", "rl.actor_lr", "rl.critic_lr", "rl.temperature", "pref.lr"):
            if get_key(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0, got {get_key(self, key)!r}")
        for key in ("sft.weight_decay", "rm.center_coef", "data.sft_samples", "data.rm_samples", "data.rl_samples", "data.max_eval"):
            if not 0 <= get_key(self, key) < float("inf"):  # nan fails this comparison too
                raise ConfigError(f"{key}: must be finite and >= 0, got {get_key(self, key)!r}")
        self.rl.health_thresholds()  # validates the rl.* health keys
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.data.eval_fraction!r}")
        from rlhf_data import DataError, StageSplit, parse_data_spec

        try:
            parse_data_spec(self.data.sources)
        except DataError as e:
            raise ConfigError(f"data.sources: {e}") from None
        if self.data.split:
            try:
                StageSplit.parse(self.data.split)
            except DataError as e:
                raise ConfigError(str(e)) from None  # the message names data.split
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1, got 0")
        if self.rl.inference_tp_size > 1 and self.rl.generation != "fast":
            raise ConfigError(f"rl.inference_tp_size: {self.rl.inference_tp_size} needs rl.generation=fast, got "
                              f"rl.generation={self.rl.generation!r}")
        if self.rl.gather_quantization != "none" and (self.rl.generation != "fast" or self.deepspeed.zero_stage != 3):
            raise ConfigError(f"rl.gather_quantization: {self.rl.gather_quantization!r} needs rl.generation=fast and "
                              f"deepspeed.zero_stage=3 (only ZeRO-3 gathers weights for generation); got "
                              f"rl.generation={self.rl.generation!r}, deepspeed.zero_stage={self.deepspeed.zero_stage}")
        if self.deepspeed.nproc % self.rl.inference_tp_size:
            raise ConfigError(f"rl.inference_tp_size: {self.rl.inference_tp_size} must divide deepspeed.nproc="
                              f"{self.deepspeed.nproc}")
        if self.rl.reward not in ("model", "verifier"):
            from rlhf_algos import available_rewards

            if self.rl.reward not in available_rewards():
                allowed = ["model", "verifier", *sorted(available_rewards())]
                raise ConfigError(f"rl.reward: {self.rl.reward!r} is not allowed; allowed: {', '.join(map(repr, allowed))} "
                                  f"(reward functions register under the entry-point group 'rlhf.rewards')")
        self._check_lora()
        self.algorithm_config()  # the algorithm exists and algo.<field> settings fit its config class

    def _check_lora(self) -> None:
        lo = self.lora
        if lo.rank < 0:
            raise ConfigError(f"lora.rank: must be >= 0 (0 = no LoRA), got {lo.rank!r}")
        if lo.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {lo.alpha!r}")
        bad = [t for t in lo.target_list() if not t.isidentifier()]
        if bad or not lo.target_list():
            raise ConfigError(f"lora.targets: {lo.targets!r} is not allowed; allowed: a comma-separated list of "
                              f"layer attribute names, e.g. 'q_proj,v_proj'")
        bad = [t for t in lo.stage_list() if t not in LoRASection.STAGES]
        if bad or not lo.stage_list():
            raise ConfigError(f"lora.stages: {lo.stages!r} is not allowed; allowed: a comma-separated list of "
                              f"{', '.join(map(repr, LoRASection.STAGES))}")
        if lo.applies_to("rl") and self.rl.gather_quantization != "none":
            raise ConfigError(f"rl.gather_quantization: {self.rl.gather_quantization!r} is not supported with LoRA on "
                              f"the RL actor (lora.rank={lo.rank}, lora.stages={lo.stages!r}): the adapters are fused "
                              f"into exactly gathered weights; use 'none'")

    def algorithm(self):
        """The class registered as ``algo.name`` (ConfigError listing the available ones if none)."""
        from rlhf_algos import get_algorithm

        try:
            cls = get_algorithm(self.algo.name)
        except ValueError as e:
            raise ConfigError(f"algo.name: {e}") from None
        if cls.kind not in ("online", "offline"):  # sft and rm are stages 1 and 2, run by --stage sft / rm
            raise ConfigError(f"algo.name: {self.algo.name!r} is a {cls.kind} algorithm, not a stage-3 one (--stage sft "
                              f"and --stage rm run stages 1 and 2); allowed: an online or offline algorithm "
                              f"(`rlhf algos list`)")
        return cls

    def algorithm_config(self):
        """The chosen algorithm's frozen config: its defaults, the loop settings it shares with the run
        (rl.* for online algorithms, pref.batch_size for preference optimisation) and the algo.* settings."""
        cls = self.algorithm()
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        shared = {"micro_batch_size": self.rl.micro_batch_size, "ppo_epochs": self.rl.epochs,
                  "max_new_tokens": self.rl.max_new_tokens, "temperature": self.rl.temperature}
        shared = {k: v for k, v in shared.items() if k in names and cls.kind == "online"}
        opts = self.algo.option_dict()
        for key in opts:
            if key not in names:
                raise ConfigError(f"algo.{key}: {self.algo.name!r} has no setting {key!r}; its settings: "
                                  f"{', '.join(sorted(names - set(shared)))} (`rlhf algos show {self.algo.name}`)")
            if key in shared:
                rl_key = {"ppo_epochs": "epochs"}.get(key, key)
                raise ConfigError(f"algo.{key}: set rl.{rl_key} instead (shared by every online algorithm)")
        try:
            return cls.config_class(**shared, **opts)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"algo ({self.algo.name}): {e}") from None


def get_key(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def field_docs(cls) -> dict[str, str]:
    """``{field: help}`` parsed from a section's ``Attributes:`` docstring block."""
    docs: dict[str, str] = {}
    current = None
    in_attrs = False
    for line in (cls.__doc__ or "").splitlines():
        s = line.strip()
        if s == "Attributes:":
            in_attrs = True
            continue
        if not in_attrs or not s:
            continue
        head, sep, rest = s.partition(":")
        if sep and head.isidentifier() and head in {f.name for f in dataclasses.fields(cls)}:
            current = head
            docs[current] = rest.strip()
        elif current:
            docs[current] += " " + s
    return docs


def all_keys(cls=RunConfig, prefix: str = "") -> dict[str, tuple[type, object, str]]:
    """Every settable dotted key: ``{key: (type, default, help)}``."""
    out = {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        if f.metadata.get("dynamic"):
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(all_keys(t, prefix + f.name + "."))
        else:
            out[prefix + f.name] = (t, getattr(inst, f.name), docs.get(f.name, ""))
    return out


def _convert(key: str, t, value):
    args = typing.get_args(t)
    if type(None) in args:  # an optional setting: "none"/"null" (or YAML null) -> None
        if value is None or isinstance(value, str) and value.strip().lower() in ("none", "null", "~"):
            return None
        (t,) = [a for a in args if a is not type(None)]
    if key == "data.sources" and isinstance(value, list):
        from rlhf_data import DataError, parse_data_spec

        try:  # the YAML list form, stored as the equivalent spec string
            return ",".join(str(s) for s in parse_data_spec(value))
        except DataError as e:
            raise ConfigError(str(e)) from None
    if isinstance(value, str) and t is float:
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string; a float key accepts it
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not a number") from None
    if isinstance(value, str) and t is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {value!r}: {e}") from None
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a boolean; allowed: true, false")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        return float(value)
    if t is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return str(value)
    return value


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build_config(values: dict[str, object]) -> RunConfig:
    """A :class:`RunConfig` from flat dotted keys (unknown keys raise, listing the allowed ones)."""
    keys = all_keys()
    sections: dict[str, dict] = {}
    top: dict[str, object] = {}
    # algo.<field>: settings of the chosen algorithm, typed by its config class (below)
    algo_raw = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("algo.") and k not in keys}
    values = {k: v for k, v in values.items() if not (k.startswith("algo.") and k not in keys)}
    for key, raw in values.items():
        if key not in keys:
            close = [k for k in keys if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; allowed keys: {', '.join(sorted(keys))}")
        value = _convert(key, keys[key][0], raw)
        if "." in key:
            sec, name = key.split(".", 1)
            sections.setdefault(sec, {})[name] = value
        else:
            top[key] = value
    if algo_raw:
        from rlhf_algos import get_algorithm

        name = sections.get("algo", {}).get("name", AlgoSection.name)
        try:
            algo_hints = typing.get_type_hints(get_algorithm(name).config_class)
        except ValueError as e:
            raise ConfigError(f"algo.name: {e}") from None
        opts = {}
        for k, raw in algo_raw.items():
            if k not in algo_hints:
                raise ConfigError(f"algo.{k}: {name!r} has no setting {k!r}; its settings: "
                                  f"{', '.join(sorted(algo_hints))} (`rlhf algos show {name}`)")
            opts[k] = _convert(f"algo.{k}", algo_hints[k], raw)
        sections.setdefault("algo", {})["options"] = tuple(sorted(opts.items()))
    hints = typing.get_type_hints(RunConfig)
    built = {sec: hints[sec](**vals) for sec, vals in sections.items()}
    try:
        return RunConfig(**top, **built)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_config(path: str | None, overrides: list[str] | None = None, **cli_values) -> RunConfig:
    """YAML file (optional) <- ``key=value`` overrides <- explicit CLI options (highest)."""
    values: dict[str, object] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file {path!r} is not valid YAML{where}: {problem}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r}: the top level must be a mapping of keys, got {type(data).__name__}")
        values.update(_flatten(data))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. algo.kl_coef=0.05")
        values[key.strip()] = value
    values.update({k: v for k, v in cli_values.items() if v is not None})
    return build_config(values)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
