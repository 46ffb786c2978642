"""The interface: entry-point registry, declared class variables, and config validation."""

from __future__ import annotations

import dataclasses
import logging
from importlib.metadata import EntryPoint, entry_points

import pytest
import rlhf_algos
from rlhf_algos import (
    ENTRY_POINT_GROUP,
    LOSS_AGG_MODES,
    CDPOConfig,
    DPOConfig,
    DrGRPOConfig,
    GRPOConfig,
    IPOConfig,
    KTOConfig,
    OnlineConfig,
    ORPOConfig,
    PPOConfig,
    ReinforcePPConfig,
    ReMaxConfig,
    RLOOConfig,
    SimPOConfig,
    available_algorithms,
    get_algorithm,
)

BUILT_INS = {
    "sft": ("supervised", "demonstrations", ("actor",)),
    "rm": ("reward_model", "pairs", ("reward",)),
    "ppo": ("online", "prompts", ("actor", "reference", "critic", "reward")),
    "grpo": ("online", "prompts", ("actor", "reference", "reward")),
    "dr_grpo": ("online", "prompts", ("actor", "reference", "reward")),
    "rloo": ("online", "prompts", ("actor", "reference", "reward")),
    "reinforce_pp": ("online", "prompts", ("actor", "reference", "reward")),
    "remax": ("online", "prompts", ("actor", "reference", "reward")),
    "dpo": ("offline", "pairs", ("actor", "reference")),
    "ipo": ("offline", "pairs", ("actor", "reference")),
    "cdpo": ("offline", "pairs", ("actor", "reference")),
    "simpo": ("offline", "pairs", ("actor",)),
    "orpo": ("offline", "pairs", ("actor",)),
    "kto": ("offline", "pairs", ("actor", "reference")),
}


def test_every_built_in_is_an_entry_point_of_the_group() -> None:
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert ENTRY_POINT_GROUP == "rlhf.algorithms"
    assert set(BUILT_INS) <= names, f"missing: {set(BUILT_INS) - names}; reinstall packages/rlhf-algos"


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_built_in_declares_the_interface(name: str) -> None:
    cls = available_algorithms()[name]
    assert get_algorithm(name) is cls
    assert issubclass(cls, rlhf_algos.Algorithm)
    assert cls.name == name
    assert (cls.kind, cls.data_kind, tuple(cls.required_models)) == BUILT_INS[name]
    assert cls.description and "\n" not in cls.description
    assert dataclasses.is_dataclass(cls.config_class) and cls.config_class.__dataclass_params__.frozen
    cfg = cls.config_class()  # defaults are valid
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.__setattr__(dataclasses.fields(cfg)[0].name, 1)
    for f in dataclasses.fields(cls.config_class):  # every option documented once, for `rlhf algos show`
        assert f.metadata.get("help"), f"{name}.{f.name} has no help"
    assert cls.config_class.section == name


def test_unknown_algorithm_lists_every_available_one_and_the_group() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'ppo2'") as info:
        get_algorithm("ppo2")
    msg = str(info.value)
    assert "rlhf.algorithms" in msg
    for name in BUILT_INS:
        assert name in msg


def _ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def test_a_plugin_registering_a_built_in_name_replaces_it(monkeypatch, caplog) -> None:
    from rlhf_algos import registry

    plugin = _ep("sft", "my_plugin.sft:MySFT")
    # whichever order the distributions are found in, the plugin wins over rlhf-algos' own registration
    for eps in ([_ep("sft", "rlhf_algos.sft:SFT"), plugin], [plugin, _ep("sft", "rlhf_algos.sft:SFT")]):
        monkeypatch.setattr(registry, "entry_points", lambda group, eps=eps: list(eps))
        assert registry._entry_points()["sft"].value == "my_plugin.sft:MySFT"
    # the replacement is logged, once per plugin target, not on every lookup
    registry._replaced_told.clear()
    caplog.clear()
    monkeypatch.setattr(registry, "entry_points", lambda group: [_ep("sft", "rlhf_algos.sft:SFT"), plugin])
    with caplog.at_level(logging.WARNING, logger="rlhf_algos.registry"):
        registry._entry_points()
        registry._entry_points()
    told = [r.getMessage() for r in caplog.records if "replaces the built-in" in r.getMessage()]
    assert told == ["algorithm 'sft': the plugin my_plugin.sft:MySFT replaces the built-in rlhf_algos.sft:SFT"]
    # two plugins claiming one name is still an error naming both
    monkeypatch.setattr(registry, "entry_points", lambda group: [plugin, _ep("sft", "other.sft:SFT")])
    with pytest.raises(ValueError, match="registered twice .* my_plugin.sft:MySFT and other.sft:SFT"):
        registry._entry_points()


def test_available_algorithms_is_sorted_and_cached() -> None:
    algos = available_algorithms()
    assert list(algos) == sorted(algos)
    assert available_algorithms() == algos
    assert available_algorithms(refresh=True) == algos


# --------------------------------------------------------------------------------------------
# Config defaults and validation
# --------------------------------------------------------------------------------------------


def test_ppo_config_defaults_are_unchanged() -> None:
    c = PPOConfig()
    assert (c.kl_coef, c.kl_estimator, c.clip_reward, c.gamma, c.lam, c.clip_eps, c.value_clip_eps) == (
        0.1, "k1", 5.0, 1.0, 0.95, 0.2, 0.2)
    assert (c.ppo_epochs, c.micro_batch_size, c.whiten_advantages, c.max_new_tokens) == (1, 32, True, 64)
    assert (c.temperature, c.top_k, c.top_p) == (1.0, 0, 1.0)
    assert (c.kl_placement, c.loss_agg, c.samples_per_prompt, c.reward_norm) == ("reward", "token-mean", 1, "none")


def test_variant_defaults() -> None:
    g = GRPOConfig()
    assert (g.kl_placement, g.kl_estimator, g.kl_coef, g.loss_agg, g.samples_per_prompt, g.scale_rewards) == (
        "loss", "k3", 0.04, "token-mean", 4, True)
    d = DrGRPOConfig()
    assert (d.scale_rewards, d.loss_agg, d.kl_placement) == (False, "seq-mean-token-sum-norm", "loss")
    r = RLOOConfig()
    assert (r.samples_per_prompt, r.kl_placement, r.kl_coef) == (4, "reward", 0.05)
    assert ReinforcePPConfig().kl_placement == "reward" and ReMaxConfig().samples_per_prompt == 1
    assert CDPOConfig().label_smoothing == 0.1 and (SimPOConfig().beta, SimPOConfig().gamma) == (2.0, 1.0)
    assert ORPOConfig().lam == 0.1 and KTOConfig().beta == 0.1 and DPOConfig().beta == IPOConfig().beta == 0.1


@pytest.mark.parametrize(("config_class", "kwargs", "message"), [
    (PPOConfig, {"kl_estimator": "k4"}, "ppo.kl_estimator: 'k4' is not allowed; allowed: 'k1', 'k2', 'k3'"),
    (PPOConfig, {"loss_agg": "sum"}, "ppo.loss_agg: 'sum' is not allowed; allowed: " +
     ", ".join(repr(m) for m in LOSS_AGG_MODES)),
    (PPOConfig, {"kl_placement": "both"}, "ppo.kl_placement: 'both' is not allowed; allowed: 'reward', 'loss'"),
    (PPOConfig, {"reward_norm": "group"}, "ppo.reward_norm: 'group' is not allowed; allowed: 'none', 'batch'"),
    (PPOConfig, {"lam": 1.5}, "ppo.lam: 1.5 is not allowed; allowed: [0.0, 1.0]"),
    (PPOConfig, {"kl_coef": -1.0}, "ppo.kl_coef: -1.0 is not allowed; allowed: >= 0.0"),
    (PPOConfig, {"micro_batch_size": 0}, "ppo.micro_batch_size: 0 is not allowed; allowed: >= 1"),
    (PPOConfig, {"temperature": 0.0}, "ppo.temperature: 0.0 is not allowed; allowed: > 0.0"),
    (OnlineConfig, {"top_p": 0.0}, "online.top_p: 0.0 is not allowed; allowed: (0.0, 1.0]"),
    (GRPOConfig, {"samples_per_prompt": 1}, "grpo.samples_per_prompt: 1 is not allowed; allowed: >= 2"),
    (DrGRPOConfig, {"kl_estimator": "kl"}, "dr_grpo.kl_estimator: 'kl' is not allowed"),
    (RLOOConfig, {"samples_per_prompt": 1}, "rloo.samples_per_prompt: 1 is not allowed; allowed: >= 2"),
    (ReinforcePPConfig, {"gamma": 2.0}, "reinforce_pp.gamma: 2.0 is not allowed; allowed: [0.0, 1.0]"),
    (ReMaxConfig, {"reward_norm": "batch"}, "remax.reward_norm: 'batch' is not allowed; allowed: 'none'"),
    (DPOConfig, {"beta": 0.0}, "dpo.beta: 0.0 is not allowed; allowed: > 0.0"),
    (IPOConfig, {"beta": -1.0}, "ipo.beta: -1.0 is not allowed; allowed: > 0.0"),
    (CDPOConfig, {"label_smoothing": 0.0}, "cdpo.label_smoothing: 0.0 is not allowed; allowed: (0.0, 0.5]"),
    (SimPOConfig, {"label_smoothing": 0.6}, "simpo.label_smoothing: 0.6 is not allowed; allowed: [0.0, 0.5]"),
    (ORPOConfig, {"lam": -0.1}, "orpo.lam: -0.1 is not allowed; allowed: >= 0.0"),
    (KTOConfig, {"desirable_weight": -1.0}, "kto.desirable_weight: -1.0 is not allowed; allowed: >= 0.0"),
])
def test_config_errors_name_the_field_the_value_and_what_is_allowed(config_class, kwargs, message: str) -> None:
    with pytest.raises(ValueError) as info:
        config_class(**kwargs)
    assert message in str(info.value)
