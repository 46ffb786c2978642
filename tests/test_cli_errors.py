"""Every user mistake ends in ONE line on stderr that starts with "error:" and names the thing.

Also: every command and every option of the CLI has help text. Each case runs
``python -m rlhf_cli`` in a fresh process (see conftest.py).
"""

from __future__ import annotations

import re

import pytest


def the_error(proc, *, alone: bool = True) -> str:
    """The single ``error:`` line of a failed run (checked to be the last line, with no traceback).

    ``alone``: the error is the only thing on stderr (the run failed before printing anything else).
    """
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0], proc.stderr
    if alone:
        assert len(lines) == 1, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout
    return errors[0]


def assert_names(line: str, *needles: str) -> None:
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"


# --------------------------------------------------------------------------------------------
# rlhf run: arguments and config
# --------------------------------------------------------------------------------------------


def test_unknown_stage(rlhf, tmp_path) -> None:
    line = the_error(rlhf(["run", "--stage", "foo", "--out", tmp_path / "o"]))
    assert_names(line, "--stage", "'foo'", "sft, rm, all", "ppo", "grpo", "dpo")


def test_missing_actor_model_directory(rlhf, tmp_path) -> None:
    line = the_error(rlhf(["run", "--actor-model", "./does-not-exist", "--out", tmp_path / "o"], cwd=tmp_path))
    assert_names(line, "--actor-model", "./does-not-exist", "does not exist")


def test_reward_model_directory_without_config(rlhf, tmp_path) -> None:
    (tmp_path / "rm").mkdir()
    line = the_error(rlhf(["run", "--reward-model", tmp_path / "rm", "--out", tmp_path / "o"]))
    assert_names(line, "--reward-model", str(tmp_path / "rm"), "no config.json")


def test_unknown_override_key(rlhf, tmp_path) -> None:
    line = the_error(rlhf(["run", "bogus.key=1", "--out", tmp_path / "o"]))
    assert_names(line, "unknown config key 'bogus.key'", "allowed keys", "sft.epochs")


def test_unknown_key_in_yaml(rlhf, tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("sft:\n  epochz: 3\n")
    line = the_error(rlhf(["run", "--config", cfg, "--out", tmp_path / "o"]))
    assert_names(line, "unknown config key 'sft.epochz'", "sft.epochs")


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("sft.epoch=3", "sft.epochs"), ("rm.lr_rate=1e-4", "rm.lr"), ("rml.lr=1", "rm.lr"), ("algo.kl_coeff=0.1", "algo.kl_coef")],
)
def test_unknown_key_suggests_the_closest(rlhf, tmp_path, key: str, suggestion: str) -> None:
    line = the_error(rlhf(["run", key, "--out", tmp_path / "o"]))
    assert_names(line, repr(key.partition("=")[0].removeprefix("algo.")), f"did you mean {suggestion}")


def test_malformed_yaml(rlhf, tmp_path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("sft: [1, 2\n")
    line = the_error(rlhf(["run", "--config", cfg, "--out", tmp_path / "o"]))
    assert_names(line, str(cfg), "not valid YAML", "line 2")


def test_missing_yaml_file(rlhf, tmp_path) -> None:
    line = the_error(rlhf(["run", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "o"]))
    assert_names(line, "nope.yaml", "does not exist")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["deepspeed.zero_stage=7"], ["deepspeed.zero_stage", "7", "allowed: 0, 1, 2, 3"]),
        (["--zero-stage", "7"], ["deepspeed.zero_stage", "7", "allowed: 0, 1, 2, 3"]),
        (["sft.lr=abc"], ["sft.lr", "'abc'", "not a number"]),
        (["sft.epochs=0"], ["sft.epochs", ">= 1", "0"]),
        (["sft.mask_prompt=maybe"], ["sft.mask_prompt", "'maybe'", "true, false"]),
        (["rl.reward=human"], ["rl.reward", "'human'", "'model'", "'verifier'"]),
        (["--nproc", "0"], ["deepspeed.nproc", ">= 1"]),
        (["rl.health_window=1"], ["rl.health_window", ">= 2", "1"]),
        (["rl.entropy_drop=1.5"], ["rl.entropy_drop", "(0, 1]", "1.5"]),
        (["rl.gen_kl_threshold=-1"], ["rl.gen_kl_threshold", ">= 0", "-1"]),
        (["rl.entropy_floor=nan"], ["rl.entropy_floor", "finite", "nan"]),
        (["sft.lr_schedule=linear"], ["sft.lr_schedule", "'linear'", "'cosine'", "'constant'"]),
        (["sft.weight_decay=-0.1"], ["sft.weight_decay", ">= 0", "-0.1"]),
        (["sft.weight_decay=nan"], ["sft.weight_decay", "finite", "nan"]),
        (["sft.epochs"], ["'sft.epochs'", "expected key=value"]),
    ],
)
def test_bad_values(rlhf, tmp_path, args: list[str], needles: list[str]) -> None:
    line = the_error(rlhf(["run", *args, "--out", tmp_path / "o"]))
    assert_names(line, *needles)


def test_typer_level_type_error_is_still_clear(rlhf, tmp_path) -> None:
    # Click's own usage errors are multi-line ("Usage: ..."), but they must still fail and name the option.
    proc = rlhf(["run", "--zero-stage", "three", "--out", tmp_path / "o"])
    assert proc.returncode == 2
    assert "--zero-stage" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# rlhf run: stage outputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["rm", "ppo"])
def test_stage_without_the_sft_output(rlhf, tmp_path, stage: str) -> None:
    out = tmp_path / "o"
    proc = rlhf(["run", "--stage", stage, "--out", out], timeout=120)
    line = the_error(proc, alone=False)  # the run's header line comes first
    assert_names(line, f"--stage {stage}", str(out / "sft"), "rlhf run --stage sft")


def test_sft_batch_larger_than_the_data(rlhf, tmp_path) -> None:
    proc = rlhf(["run", "--stage", "sft", "--out", tmp_path / "o", "sft.batch_size=100000"], timeout=300)
    line = the_error(proc, alone=False)
    assert_names(line, "sft.batch_size: 100000 x 1 rank(s) is more than the", "SFT samples", "lower it")


def test_ppo_with_model_reward_without_the_rm_output(rlhf, tmp_path) -> None:
    from rlhf_data import AdditionTask, train_demo_tokenizer
    from rlhf_hybrid import tiny_llama_config
    from transformers import LlamaForCausalLM

    out = tmp_path / "o"
    tok = train_demo_tokenizer(AdditionTask().corpus())
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=16, num_layers=1, num_heads=2,
                                               intermediate_size=32, pad_token_id=tok.pad_token_id,
                                               eos_token_id=tok.eos_token_id))
    model.save_pretrained(out / "sft")
    tok.save_pretrained(out / "sft")
    proc = rlhf(["run", "--stage", "ppo", "--out", out, "rl.reward=model", "data.num_eval=20", "data.num_valid=10"],
                timeout=180)
    line = the_error(proc, alone=False)
    assert_names(line, "--stage ppo", str(out / "rm"), "rlhf run --stage rm")


# --------------------------------------------------------------------------------------------
# rlhf chat
# --------------------------------------------------------------------------------------------


def test_chat_on_a_directory_without_config(rlhf, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    line = the_error(rlhf(["chat", "--model", tmp_path / "empty", "--prompt", "What is 1 + 2?"]))
    assert_names(line, "--model", str(tmp_path / "empty"), "no config.json")


def test_chat_on_a_missing_directory(rlhf, tmp_path) -> None:
    line = the_error(rlhf(["chat", "--model", tmp_path / "missing", "--prompt", "hi"]))
    assert_names(line, "--model", "missing")


@pytest.mark.parametrize(("args", "needle"), [(["--max-new-tokens", "0"], "--max-new-tokens"),
                                              (["--temperature", "-1"], "--temperature")])
def test_chat_bad_generation_settings(rlhf, tmp_path, args: list[str], needle: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    line = the_error(rlhf(["chat", "--model", d, "--prompt", "hi", *args]))
    assert_names(line, needle)


# --------------------------------------------------------------------------------------------
# help text
# --------------------------------------------------------------------------------------------

COMMANDS = [["run"], ["chat"], ["config-keys"], ["env"], ["algos", "list"], ["algos"], ["envs", "list"], ["envs"], ["report"],
            []]


def help_entries(text: str) -> dict[str, str]:
    """``{entry: help}`` for every item of the Options/Arguments/Commands sections of a help page."""
    entries: dict[str, str] = {}
    section = None
    current = None
    for raw in text.splitlines():
        if re.match(r"^(Options|Arguments|Commands):\s*$", raw):
            section, current = raw.strip(), None
            continue
        if section is None or not raw.strip():
            current = None if not raw.strip() else current
            continue
        if not raw.startswith(" "):
            section = None
            continue
        indent = len(raw) - len(raw.lstrip())
        if indent == 2:  # a new entry: "  -s, --stage <str>   Which stage(s): ..."
            name, _, rest = raw.strip().partition("  ")
            current = name.strip()
            entries[current] = rest.strip()
        elif current is not None:  # a continuation line of the current entry's help
            entries[current] = (entries[current] + " " + raw.strip()).strip()
    return entries


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "rlhf")
def test_every_command_and_option_has_help(rlhf, command: list[str]) -> None:
    proc = rlhf([*command, "--help"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage:"), proc.stdout
    # the command's own description: the first paragraph after the usage line
    paragraphs = [p.strip() for p in proc.stdout.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 2 and not paragraphs[1].startswith(("Options", "Arguments")), proc.stdout
    entries = help_entries(proc.stdout)
    assert re.search(r"^  --help +Show this message and exit\.$", proc.stdout, re.M), proc.stdout
    assert entries, proc.stdout
    for name, text in entries.items():
        assert text, f"`rlhf {' '.join(command)} --help`: {name!r} has no help text\n{proc.stdout}"


def test_help_lists_every_declared_option() -> None:
    """Every option Typer knows about is documented (the source of truth, not the rendering)."""
    import click
    import typer
    from rlhf_cli.app import app

    root = typer.main.get_command(app)
    seen = 0

    def walk(cmd: click.Command, path: str) -> None:
        nonlocal seen
        assert (cmd.help or cmd.short_help or "").strip(), f"{path}: no help"
        for p in cmd.params:
            if p.name == "help":
                continue
            assert (getattr(p, "help", None) or "").strip(), f"{path} {p.name}: no help text"
            seen += 1
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(root, "rlhf")
    assert seen >= 13  # run: 9 incl. overrides, chat: 4


def test_config_keys_lists_every_key_with_text(rlhf) -> None:
    from rlhf_cli.config import all_keys

    proc = rlhf(["config-keys"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(all_keys())
    for line in lines:
        m = re.match(r"^([a-z_.]+) \((\w+), default .*\): (.+)$", line)
        assert m and m.group(3).strip(), line


def test_algos_list_and_env(rlhf) -> None:
    algos = rlhf(["algos", "list"], timeout=60)
    assert algos.returncode == 0, algos.stderr
    assert re.search(r"^ppo\tonline\tdata=prompts\tmodels=actor,reference,critic,reward\tPPO ", algos.stdout, re.M), (
        algos.stdout)
    for name, kind, data in [("grpo", "online", "prompts"), ("rloo", "online", "prompts"), ("dpo", "offline", "pairs"),
                             ("kto", "offline", "pairs"), ("simpo", "offline", "pairs")]:
        assert re.search(rf"^{name}\t{kind}\tdata={data}\t", algos.stdout, re.M), (name, algos.stdout)
    # stages 1 and 2 are registered algorithms too; `algos show` names their sft.* / rm.* keys
    assert re.search(r"^sft\tsupervised\tdata=demonstrations\tmodels=actor\tSFT", algos.stdout, re.M), algos.stdout
    assert re.search(r"^rm\treward_model\tdata=pairs\tmodels=reward\tReward model", algos.stdout, re.M), algos.stdout
    sft = rlhf(["algos", "show", "sft"], timeout=60)
    assert sft.returncode == 0 and "sft.mask_prompt (bool, default True):" in sft.stdout, sft.stdout + sft.stderr
    rm = rlhf(["algos", "show", "rm"], timeout=60)
    assert rm.returncode == 0 and "rm.center_coef (float, default 0.01):" in rm.stdout, rm.stdout + rm.stderr
    show = rlhf(["algos", "show", "grpo"], timeout=60)
    assert show.returncode == 0, show.stderr
    assert "algo.samples_per_prompt (int, default 4):" in show.stdout
    assert "rl.max_new_tokens (int, default 8):" in show.stdout  # shared settings come from rl.*
    bad = rlhf(["algos", "show", "nosuch"], timeout=60)
    assert bad.returncode == 2 and "unknown algorithm 'nosuch'" in bad.stderr and "grpo" in bad.stderr
    env = rlhf(["env"], timeout=120)
    assert env.returncode == 0, env.stderr
    for mod in ("torch", "transformers", "deepspeed", "rlhf_cli"):
        assert mod in env.stdout, env.stdout
