"""A third-party algorithm, packaged the way a user would: its own pyproject.toml with an
``rlhf.algorithms`` entry point, pip-installed into this environment, then listed by
``rlhf algos list`` and run by ``rlhf run`` on the demo."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PLUGIN = textwrap.dedent('''
    """A test plugin: plain NLL on the chosen answers of preference pairs."""

    from dataclasses import dataclass, field

    from rlhf_algos import OfflineAlgorithm, OfflineConfig


    @dataclass(frozen=True)
    class ChosenNLLConfig(OfflineConfig):
        """Attributes:
            weight: loss weight.
        """

        weight: float = field(default=1.0, metadata={"help": "loss weight"})

        def __post_init__(self) -> None:
            if self.weight <= 0:
                raise ValueError(f"chosen_nll.weight: {self.weight!r} is not allowed; allowed: > 0")


    class ChosenNLL(OfflineAlgorithm):
        name = "chosen_nll"
        description = "SFT on the chosen answers of the pairs (test plugin)"
        required_models = ("actor",)
        config_class = ChosenNLLConfig

        def compute_loss(self, logps, ref_logps, mask):
            chosen, _ = self.split_pairs(logps * mask)
            chosen_mask, _ = self.split_pairs(mask)
            loss = -self.config.weight * chosen.sum() / chosen_mask.sum().clamp(min=1)
            return loss, {"chosen_tokens": chosen_mask.sum().detach()}
''')

PYPROJECT = textwrap.dedent('''
    [build-system]
    requires = ["setuptools>=61"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "rlhf-test-plugin-chosen-nll"
    version = "0.0.1"
    dependencies = []

    [project.entry-points."rlhf.algorithms"]
    chosen_nll = "rlhf_test_plugin_chosen_nll:ChosenNLL"

    [tool.setuptools]
    py-modules = ["rlhf_test_plugin_chosen_nll"]
''')

TINY = ["data.num_eval=40", "data.num_valid=20", "model.hidden_size=64", "model.intermediate_size=128",
        "sft.epochs=1", "pref.epochs=1", "pref.batch_size=64", "rl.max_new_tokens=4"]


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    src = tmp_path_factory.mktemp("plugin")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "rlhf_test_plugin_chosen_nll.py").write_text(PLUGIN)
    # offline: the build uses the setuptools already installed here
    proc = pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(src))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield src
    finally:
        pip("uninstall", "-y", "rlhf-test-plugin-chosen-nll")


def test_plugin_is_listed_and_shown(plugin, rlhf) -> None:
    proc = rlhf(["algos", "list"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "chosen_nll\toffline\tdata=pairs\tmodels=actor\tSFT on the chosen answers" in proc.stdout
    show = rlhf(["algos", "show", "chosen_nll"], timeout=60)
    assert "algo.weight (float, default 1.0): loss weight" in show.stdout


def test_plugin_runs_as_a_stage_on_the_demo(plugin, rlhf, explain, tmp_path) -> None:
    out = tmp_path / "out"
    proc = rlhf(["run", "--stage", "all", "--algo", "chosen_nll", "--out", out, *TINY, "algo.weight=0.5"],
                timeout=600)
    assert proc.returncode == 0, explain(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"sft", "chosen_nll"} and "rm" not in summary  # no reward model for pairs
    assert summary["chosen_nll"]["algo"] == "chosen_nll" and summary["chosen_nll"]["train_steps"] > 0
    assert (out / "chosen_nll" / "config.json").is_file()
    card = json.loads((out / "chosen_nll" / "run_card.json").read_text())
    assert card["config"]["algo"]["options"] == [["weight", 0.5]]
    bad = rlhf(["run", "--stage", "chosen_nll", "--out", out, "algo.weight=-1"], timeout=120)
    assert bad.returncode == 2 and "chosen_nll.weight: -1.0 is not allowed; allowed: > 0" in bad.stderr
