"""The run configuration: frozen dataclasses, loaded from YAML plus ``key=value`` overrides.

Every field is documented once, by its ``option(help=)`` in rlhf_cli/config_sections.py, where each
section also validates its own fields; ``rlhf run --help``, ``rlhf config-keys`` and the key table in
docs/cli.md derive from it. :class:`RunConfig` adds the rules that span sections. Unknown keys (with a
"did you mean" suggestion) and malformed values raise :class:`ConfigError` naming the key, the value
and what is allowed; nothing is silently rewritten.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config_model import ModelSection
from .config_report import ReportSection
from .config_runtime import CheckpointSection, DistributedSection, OffloadSection, TrainSection
from .config_sections import (
    AlgoSection,
    ConfigError,
    DataSection,
    DeepSpeedSection,
    LoRASection,
    PrefSection,
    RLSection,
    RMSection,
    SFTSection,
    did_you_mean,
    field_help,
    option,
    registered_algorithm,
)

__all__ = [
    "AlgoSection",
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "DeepSpeedSection",
    "DistributedSection",
    "LoRASection",
    "ModelSection",
    "OffloadSection",
    "PrefSection",
    "RLSection",
    "RMSection",
    "ReportSection",
    "RunConfig",
    "SFTSection",
    "TrainSection",
    "all_keys",
    "build_config",
    "field_help",
    "load_config",
    "option",
    "resolved_settings",
    "to_dict",
    "to_yaml",
]


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``rlhf run`` needs: two settings and one section per field below (each section
    validates its own fields; ``__post_init__`` checks the rules that span sections)."""

    out: str = option("rlhf-out", "output directory (``<out>/sft``, ``<out>/rm``, ``<out>/<algo>``, "
                                  "``<out>/summary.json``).")
    seed: int = option(42, "global seed.")
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    sft: SFTSection = field(default_factory=SFTSection)
    rm: RMSection = field(default_factory=RMSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    rl: RLSection = field(default_factory=RLSection)
    pref: PrefSection = field(default_factory=PrefSection)
    lora: LoRASection = field(default_factory=LoRASection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    offload: OffloadSection = field(default_factory=OffloadSection)
    report: ReportSection = field(default_factory=ReportSection)

    def __post_init__(self) -> None:
        rl, ds, lo = self.rl, self.deepspeed, self.lora
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed: {self.seed!r} is not allowed; allowed: 0..{2**32 - 1}")
        if rl.gather_quantization != "none" and (rl.generation != "fast" or ds.zero_stage != 3):
            raise ConfigError(f"rl.gather_quantization: {rl.gather_quantization!r} needs rl.generation=fast and "
                              f"deepspeed.zero_stage=3 (only ZeRO-3 gathers weights for generation); got "
                              f"rl.generation={rl.generation!r}, deepspeed.zero_stage={ds.zero_stage}")
        if self.offload.roles() and ds.zero_stage != 3:
            raise ConfigError(f"offload.{self.offload.roles()[0]}: needs deepspeed.zero_stage=3 (only ZeRO-3 partitions "
                              f"parameters), got deepspeed.zero_stage={ds.zero_stage}")
        if ds.nproc % rl.inference_tp_size:
            raise ConfigError(f"rl.inference_tp_size: {rl.inference_tp_size} must divide deepspeed.nproc={ds.nproc}")
        if lo.applies_to("rl") and rl.gather_quantization != "none":
            raise ConfigError(f"rl.gather_quantization: {rl.gather_quantization!r} is not supported with LoRA on "
                              f"the RL actor (lora.rank={lo.rank}, lora.stages={lo.stages!r}): the adapters are fused "
                              f"into exactly gathered weights; use 'none'")
        self.model.check_dtype(ds.dtype)
        if rl.padding_free and "batch_layout" not in RLSection.shared_with(self.algorithm()):
            raise ConfigError(f"rl.padding_free: true, but algo.name={self.algo.name!r} has no padding-free learn "
                              f"step (its config has no OnlineConfig.batch_layout); allowed: false, or an online "
                              f"algorithm (ppo, grpo, dr_grpo, rloo, reinforce_pp, remax)")
        self.algorithm_config()  # the algo.<field> values fit the algorithm's config class, with the rl.* ones

    def algorithm(self):
        """The class registered as ``algo.name``."""
        return self.algo.algorithm()

    def algorithm_config(self, padding_free_layout: str = "rows"):
        """The chosen algorithm's frozen config: its defaults, the loop settings it shares with the run
        (the rl.* keys of ``RLSection.ALGO_KEYS``, online algorithms only) and the algo.* settings.

        ``padding_free_layout``: the ``batch_layout`` rl.padding_free=true stands for (the actor's,
        ``rlhf_hybrid.padding_free_layout``: "rows", or "one_row" under flash attention)."""
        cls = self.algorithm()
        try:
            return cls.config_class(**self.rl.algorithm_values(cls, padding_free_layout), **self.algo.option_dict())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"algo ({self.algo.name}): {e}") from None


def all_keys(cls=RunConfig, prefix: str = "") -> dict[str, tuple[type, object, str]]:
    """Every settable dotted key: ``{key: (type, default, help)}``."""
    out = {}
    hints = typing.get_type_hints(cls)
    docs = field_help(cls)
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


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond the float range
        return math.inf


def _check_all_finite(sections: dict[str, object]) -> None:
    """Every float setting of the built ``sections`` is finite. Each section checks its ranges first (with
    its own messages); this catches what a range check lets through (``inf > 0``) and keys without one,
    before the cross-section rules (which build the algorithm's config) run."""
    for name, section in sections.items():
        items = [(f"{name}.{f.name}", getattr(section, f.name)) for f in dataclasses.fields(section)]
        if name == "algo":
            items += [(f"algo.{k}", v) for k, v in section.options]
        for key, v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}: {v!r} is not allowed; allowed: a finite number")


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
            number = float(value)  # YAML 1.1 reads "1e-3" as a string; a float key accepts it
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not a number") from None
        return number
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
        return _as_float(value)
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


def _algo_options(name: str, raw: dict[str, object]) -> tuple:
    """algo.<field> values typed by ``name``'s config class, as sorted pairs; :class:`AlgoSection` checks
    the field names (one place for the "has no setting" and "set rl.* instead" errors)."""
    config_class = registered_algorithm(name).config_class
    hints = typing.get_type_hints(config_class)
    names = {f.name for f in dataclasses.fields(config_class)}
    return tuple(sorted((k, _convert(f"algo.{k}", hints[k], v) if k in names else v) for k, v in raw.items()))


def build_config(values: dict[str, object]) -> RunConfig:
    """A :class:`RunConfig` from flat dotted keys (unknown keys raise, suggesting the closest ones)."""
    keys = all_keys()
    sections: dict[str, dict] = {}
    top: dict[str, object] = {}
    algo_raw: dict[str, object] = {}  # algo.<field>: settings of the chosen algorithm, typed by its config class
    for key, raw in values.items():
        if key.startswith("algo.") and key not in keys:
            algo_raw[key.removeprefix("algo.")] = raw
        elif key not in keys:
            raise ConfigError(f"unknown config key {key!r}{did_you_mean(key, keys)}; allowed keys: "
                              f"{', '.join(sorted(keys))}")
        else:
            section, _, name = key.rpartition(".")
            (sections.setdefault(section, {}) if section else top)[name] = _convert(key, keys[key][0], raw)
    if algo_raw:
        name = sections.get("algo", {}).get("name", AlgoSection.name)
        sections.setdefault("algo", {})["options"] = _algo_options(name, algo_raw)
    hints = typing.get_type_hints(RunConfig)
    try:  # the sections in RunConfig's order, each checking its own fields, then the rules across them
        built = {name: hints[name](**sections[name]) for name in hints if name in sections}
        _check_all_finite(built)
        return RunConfig(**top, **built)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (PyYAML keeps the last
    one silently: a section written twice would drop the first block)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise _DuplicateKey(f"key {key!r} appears twice (line {first} and line {line}); "
                                    f"give each key once (merge the two blocks)")
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_config(path: str | None, overrides: list[str] | None = None, **cli_values) -> RunConfig:
    """YAML file (optional) <- ``key=value`` overrides <- explicit CLI options (highest)."""
    values: dict[str, object] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path!r} is not a UTF-8 text file (byte {e.start}: "
                              f"{e.object[e.start:e.start + 1]!r})") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path!r} is a directory, not a YAML file") from None
        except OSError as e:
            raise ConfigError(f"config file {path!r} cannot be read: {e.strerror or e}") from None
        except _DuplicateKey as e:
            raise ConfigError(f"config file {path!r}: {e}") from None
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


def resolved_settings(cfg: RunConfig) -> dict[str, object]:
    """Every setting of ``cfg`` as flat dotted keys: each section's fields, then every ``algo.<field>`` of
    the chosen algorithm's resolved config (defaults included; the fields it takes from rl.* excepted)."""
    flat: dict[str, object] = {}
    for key in all_keys():
        section, _, name = key.rpartition(".")
        flat[key] = getattr(getattr(cfg, section) if section else cfg, name)
    shared = RLSection.shared_with(cfg.algorithm())
    algo_config = cfg.algorithm_config()
    for f in dataclasses.fields(algo_config):
        if f.name not in shared:
            flat[f"algo.{f.name}"] = getattr(algo_config, f.name)
    return flat


def to_yaml(cfg: RunConfig, header: str = "") -> str:
    """``cfg`` as a YAML config (every resolved setting, :func:`resolved_settings`) that :func:`load_config`
    reads back to an equal :class:`RunConfig`; ``header`` is written first as comment lines."""
    nested: dict[str, dict | object] = {}
    for key, value in resolved_settings(cfg).items():
        section, _, name = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[name] = value
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + yaml.safe_dump(nested, sort_keys=False, default_flow_style=False)
