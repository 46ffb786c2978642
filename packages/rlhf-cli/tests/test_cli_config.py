"""rlhf_cli.config: YAML <- key=value overrides <- explicit options, type conversion, errors."""

from __future__ import annotations

import dataclasses

import pytest
from rlhf_cli.config import ConfigError, RunConfig, all_keys, build_config, load_config


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_without_any_input() -> None:
    assert load_config(None, []) == RunConfig()


def test_precedence_yaml_then_overrides_then_options(tmp_path) -> None:
    path = write(tmp_path, "seed: 1\nsft:\n  epochs: 3\n  lr: 0.01\nalgo:\n  kl_coef: 0.2\n")
    cfg = load_config(path, ["sft.epochs=5", "algo.kl_coef=0.3", "algo.kl_coef=0.4"], seed=9)
    assert cfg.sft.epochs == 5  # override beats YAML
    assert cfg.sft.lr == 0.01  # YAML beats default
    assert cfg.algo.option_dict() == {"kl_coef": 0.4}  # the last override wins
    assert cfg.algorithm_config().kl_coef == 0.4
    assert cfg.seed == 9  # explicit option beats YAML
    assert cfg.rm == RunConfig().rm  # untouched sections keep their defaults


def test_explicit_option_beats_override_and_none_means_unset(tmp_path) -> None:
    cfg = load_config(None, ["deepspeed.zero_stage=2", "out=a"], **{"deepspeed.zero_stage": 3, "out": None})
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.out == "a"


@pytest.mark.parametrize(
    ("item", "key", "expected"),
    [
        ("sft.lr=1e-3", "sft.lr", 1e-3),  # YAML 1.1 reads 1e-3 as a string; a float key accepts it
        ("sft.lr=5E-4", "sft.lr", 5e-4),
        ("sft.lr=2", "sft.lr", 2.0),  # an int where a float is expected
        ("sft.mask_prompt=false", "sft.mask_prompt", False),
        ("sft.mask_prompt=true", "sft.mask_prompt", True),
        ("deepspeed.offload_optimizer=True", "deepspeed.offload_optimizer", True),
        ("sft.epochs=7", "sft.epochs", 7),
        ("model.actor_model=./m", "model.actor_model", "./m"),
        ("out=123", "out", "123"),  # a str key keeps digits as text
    ],
)
def test_override_type_conversion(item: str, key: str, expected) -> None:
    extra = ["deepspeed.zero_stage=1"] if "offload" in item else []
    cfg = load_config(None, [item, *extra])
    section, _, name = key.rpartition(".")
    value = getattr(getattr(cfg, section), name) if section else getattr(cfg, name)
    assert value == expected and type(value) is type(expected)


def test_yaml_types_convert_too(tmp_path) -> None:
    path = write(tmp_path, "sft:\n  lr: 1e-3\n  mask_prompt: false\nrl:\n  temperature: 1\nalgo:\n  clip_reward: null\n")
    cfg = load_config(path)
    assert cfg.sft.lr == 1e-3 and isinstance(cfg.sft.lr, float)
    assert cfg.sft.mask_prompt is False
    assert cfg.rl.temperature == 1.0 and isinstance(cfg.rl.temperature, float)
    assert cfg.algorithm_config().clip_reward is None  # an optional algorithm setting takes YAML null


def test_empty_yaml_is_the_defaults(tmp_path) -> None:
    assert load_config(write(tmp_path, "# nothing\n")) == RunConfig()


@pytest.mark.parametrize(
    ("items", "needles"),
    [
        (["sft.lr=abc"], ["sft.lr", "'abc'", "not a number"]),
        (["sft.epochs=2.5"], ["sft.epochs", "2.5", "not an integer"]),
        (["sft.epochs=true"], ["sft.epochs", "True", "not an integer"]),
        (["sft.mask_prompt=maybe"], ["sft.mask_prompt", "'maybe'", "allowed: true, false"]),
        (["deepspeed.zero_stage=7"], ["deepspeed.zero_stage", "7", "allowed: 0, 1, 2, 3"]),
        (["deepspeed.dtype=fp8"], ["deepspeed.dtype", "'fp8'", "'fp32'", "'bf16'"]),
        (["rl.reward=human"], ["rl.reward", "'human'", "'model'", "'verifier'"]),
        (["algo.kl_estimator=k4"], ["algo (ppo)", "kl_estimator", "'k4'", "'k1'"]),
        (["rl.select=worst"], ["rl.select", "'worst'", "'best'", "'last'"]),
        (["data.sources=nope"], ["data.sources", "'nope'", "available", "hh", "shp", "demo"]),
        (["data.sources=hh:-0.5"], ["data.sources", "weight -0.5", "positive"]),
        (["data.split=2,x,4"], ["data.split", "'x'", "not a number"]),
        (["data.split=0,0,0"], ["data.split", "0,0,0", "not all zero"]),
        (["data.truncation=cut"], ["data.truncation", "'cut'", "'truncate'", "'drop'"]),
        (["data.eval_fraction=1.5"], ["data.eval_fraction", "[0, 1)"]),
        (["sft.epochs=0"], ["sft.epochs", ">= 1", "0"]),
        (["rl.actor_lr=0"], ["rl.actor_lr", "> 0"]),
        (["deepspeed.offload_optimizer=true"], ["deepspeed.offload_optimizer", "zero_stage"]),
        (["bogus.key=1"], ["unknown config key 'bogus.key'", "allowed keys", "sft.epochs"]),
        (["ppo.epochs=1"], ["unknown config key 'ppo.epochs'", "did you mean sft.epochs, rm.epochs"]),
        (["algo.name=nosuch"], ["algo.name", "'nosuch'", "ppo", "grpo", "dpo"]),
        (["algo.name=sft"], ["algo.name", "'sft'", "supervised algorithm, not a stage-3 one", "--stage sft"]),
        (["algo.name=rm"], ["algo.name", "'rm'", "reward_model algorithm, not a stage-3 one", "online or offline"]),
        (["rm.center_coef=-0.1"], ["rm.center_coef", "finite and >= 0", "-0.1"]),
        (["rm.center_coef=nan"], ["rm.center_coef", "finite and >= 0", "nan"]),
        (["algo.bogus=1"], ["algo.bogus", "'ppo' has no setting 'bogus'", "kl_coef", "rlhf algos show ppo"]),
        (["algo.kl_coef=abc"], ["algo.kl_coef", "'abc'", "not a number"]),
        (["algo.max_new_tokens=4"], ["algo.max_new_tokens", "set rl.max_new_tokens instead"]),
        (["rl.reward=nosuch"], ["rl.reward", "'nosuch'", "'addition'", "rlhf.rewards"]),
        (["rl.inference_tp_size=2"], ["rl.inference_tp_size", "needs rl.generation=fast"]),
        (["rl.inference_tp_size=2", "rl.generation=fast"], ["rl.inference_tp_size", "must divide deepspeed.nproc=1"]),
        (["rl.gather_quantization=int3"], ["rl.gather_quantization", "'int3'", "'int8'"]),
        (["rl.gather_quantization=int8", "rl.generation=fast", "deepspeed.zero_stage=3", "lora.rank=4"],
         ["rl.gather_quantization", "not supported with LoRA", "lora.rank=4"]),
        (["rl.gather_quantization=int8", "rl.generation=fast"],
         ["rl.gather_quantization", "deepspeed.zero_stage=3", "deepspeed.zero_stage=0"]),
        (["rl.generation=vllm"], ["rl.generation", "'vllm'", "'hf'", "'fast'"]),
        (["sft.epochs"], ["'sft.epochs'", "expected key=value"]),
        (["=3"], ["'=3'", "expected key=value"]),
        (["lora.rank=-1"], ["lora.rank", ">= 0", "-1"]),
        (["lora.alpha=0"], ["lora.alpha", "> 0", "0"]),
        (["lora.targets=q_proj,v-proj"], ["lora.targets", "'q_proj,v-proj'", "comma-separated", "layer"]),
        (["lora.targets="], ["lora.targets", "''", "comma-separated"]),
        (["lora.stages=sft,rm"], ["lora.stages", "'sft,rm'", "'sft'", "'rl'", "'pref'"]),
        (["sft.lr=nan"], ["sft.lr", "> 0", "nan"]),  # nan passed the old '<= 0' test
        (["rl.temperature=nan"], ["rl.temperature", "> 0", "nan"]),
        (["lora.alpha=nan"], ["lora.alpha", "> 0", "nan"]),
        (["algo.name=dpo", "algo.temperature=1"], ["'dpo' has no setting 'temperature'; its settings: beta ("]),
        (["rl.ptx_coef=-0.5"], ["rl.ptx_coef", "finite and >= 0", "-0.5"]),
        (["rl.ptx_coef=nan"], ["rl.ptx_coef", "nan"]),
        (["rl.ptx_coef=inf"], ["rl.ptx_coef", "inf"]),
        (["algo.ptx_coef=0.1"], ["algo.ptx_coef", "set rl.ptx_coef instead"]),
        (["distributed.timeout_s=0"], ["distributed.timeout_s", "> 0", "0"]),
        (["distributed.timeout_s=nan"], ["distributed.timeout_s", "nan"]),
        (["distributed.timeout_s=abc"], ["distributed.timeout_s", "'abc'", "not a number"]),
    ],
)
def test_errors_name_key_value_and_allowed(items: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, items)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_yaml_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2"):
        load_config(write(tmp_path, "sft: [1, 2\n"))
    with pytest.raises(ConfigError, match=r"top level must be a mapping.*list"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'sft\.epochz'"):
        load_config(write(tmp_path, "sft:\n  epochz: 3\n"))


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_every_key_is_documented_and_buildable() -> None:
    keys = all_keys()
    assert "sft.epochs" in keys and "algo.name" in keys and "rl.iterations" in keys and "out" in keys
    assert "algo.options" not in keys  # algo.<field> keys belong to the chosen algorithm (rlhf algos show)
    for key, (t, default, doc) in keys.items():
        assert doc.strip(), f"{key} has no documentation"
        assert isinstance(default, t), (key, t, default)
    # every default round-trips through build_config
    assert build_config({k: v for k, (_, v, _) in keys.items()}) == RunConfig()


def test_config_is_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_data_sources_yaml_list_form(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        "data:\n"
        "  sources:\n"
        "    - hh:0.5\n"
        "    - {source: shp, weight: 0.3}\n"
        "    - {source: local, path: ./x.csv, weight: 0.2, columns: {prompt: question, chosen: good, rejected: bad}}\n"
    )
    cfg = load_config(str(p))
    assert cfg.data.sources == "hh:0.5,shp:0.3,local:./x.csv[prompt=question,chosen=good,rejected=bad]:0.2"
    from rlhf_data import parse_data_spec

    assert parse_data_spec(cfg.data.sources) == parse_data_spec("hh:0.5,shp:0.3,local:./x.csv[prompt=question,"
                                                                "chosen=good,rejected=bad]:0.2")
    p.write_text("data:\n  sources:\n    - {source: hh, weight: -1}\n")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight: -1 must be a positive number"):
        load_config(str(p))


def test_lora_keys() -> None:
    from rlhf_hybrid.lora import DEFAULT_TARGETS

    cfg = RunConfig()
    assert cfg.lora.rank == 0 and not cfg.lora.applies_to("sft")  # off by default
    assert cfg.lora.target_list() == DEFAULT_TARGETS  # the default spelled out in config.py is the library's
    cfg = load_config(None, ["lora.rank=8", "lora.targets=q_proj, v_proj", "lora.stages=rl"])
    assert cfg.lora.target_list() == ("q_proj", "v_proj")
    assert [cfg.lora.applies_to(s) for s in ("sft", "rl", "pref")] == [False, True, False]


def test_ptx_and_distributed_keys() -> None:
    from rlhf_hybrid.distributed import DEFAULT_TIMEOUT_S

    cfg = RunConfig()
    assert cfg.rl.ptx_coef == 0.0 and cfg.algorithm_config().ptx_coef == 0.0  # off by default
    assert cfg.distributed.timeout_s == DEFAULT_TIMEOUT_S  # the default spelled out in config_runtime.py
    cfg = load_config(None, ["rl.ptx_coef=0.25", "distributed.timeout_s=90", "algo.name=grpo"])
    assert cfg.algorithm_config().ptx_coef == 0.25  # rl.ptx_coef reaches every online algorithm's config
    assert cfg.distributed.timeout_s == 90.0


def test_stage_one_and_two_settings_build_the_registered_algorithms_configs() -> None:
    # rlhf run builds rlhf_algos.SFTConfig / RMConfig from the sft.* / rm.* keys (stages/sft.py, stages/rm.py)
    from rlhf_algos import RMConfig, SFTConfig, get_algorithm

    cfg = load_config(None, ["sft.mask_prompt=false", "sft.packing=true", "rm.center_coef=0.5"])
    assert get_algorithm("sft").config_class is SFTConfig and get_algorithm("rm").config_class is RMConfig
    assert SFTConfig(mask_prompt=cfg.sft.mask_prompt, packing=cfg.sft.packing) == SFTConfig(mask_prompt=False,
                                                                                         packing=True)
    assert RMConfig(center_coef=cfg.rm.center_coef).center_coef == 0.5


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("sft.epoch", "(did you mean sft.epochs?)"),  # a known section: its closest names
        ("rm.lr_rate", "(did you mean rm.lr?)"),  # a name that extends a real one
        ("rml.lr", "(did you mean rm.lr, sft.lr, pref.lr?)"),  # a right name under a wrong section
        ("ppo.epochs", "(did you mean sft.epochs, rm.epochs, rl.epochs, pref.epochs?)"),
        ("data.source", "(did you mean data.sources?)"),
        ("epochz", "(did you mean sft.epochs, rm.epochs, rl.epochs, pref.epochs?)"),
        ("sft", "(sft is a section: set sft.<field>, e.g. sft.epochs)"),
        ("algo.kl_coeff", "(did you mean algo.kl_coef?)"),
        ("algo.nmae", "(did you mean algo.name?)"),
    ],
)
def test_unknown_keys_suggest_the_closest(key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=1"])
    assert hint in str(e.value), str(e.value)


@pytest.mark.parametrize("key", ["bogus.key", "algo.bogus"])
def test_nothing_close_no_suggestion(key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=1"])
    assert "did you mean" not in str(e.value)


def test_each_section_validates_itself() -> None:
    from rlhf_cli.config import DataSection, DeepSpeedSection, LoRASection, RLSection, SFTSection

    cases = [(SFTSection, {"epochs": 0}, "sft.epochs: must be >= 1, got 0"),
             (DeepSpeedSection, {"offload_optimizer": True}, "deepspeed.offload_optimizer: needs"),
             (DataSection, {"eval_fraction": 1.0}, "data.eval_fraction: must be in [0, 1)"),
             (RLSection, {"health_window": 1}, "rl.health_window:"),
             (LoRASection, {"stages": "rm"}, "lora.stages: 'rm' is not allowed")]
    for section, kwargs, message in cases:
        with pytest.raises(ConfigError) as e:
            section(**kwargs)  # without a RunConfig around it
        assert str(e.value).startswith(message), str(e.value)


def test_sections_are_named_by_their_run_config_field() -> None:
    from rlhf_cli.config_sections import Section

    for f in dataclasses.fields(RunConfig):
        if isinstance(f.default_factory, type) and issubclass(f.default_factory, Section):
            assert f.default_factory.section == f.name


def test_one_documentation_mechanism_with_the_algorithm_configs() -> None:
    # config sections and rlhf_algos' algorithm configs both document a field by option(default, help)
    from rlhf_algos import PPOConfig
    from rlhf_algos.base import option as algos_option
    from rlhf_cli.config import field_help, option

    assert option(1, "x").metadata == algos_option(1, "x").metadata
    assert field_help(PPOConfig)["kl_coef"].startswith("beta")
    for section in (f.default_factory for f in dataclasses.fields(RunConfig) if f.default_factory is not dataclasses.MISSING):
        assert set(field_help(section)) == {f.name for f in dataclasses.fields(section)} - {"options"}
