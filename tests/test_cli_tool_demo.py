"""``rlhf run --data tool-demo``: SFT on the multi-turn demonstrations -> GRPO against the calculator.

* the run completes sft -> grpo (no reward-model stage) at tiny sizes; summary.json's before/after
  rates equal a recount from the saved held-out episodes, and those episodes are the model's greedy
  episodes, replayed here turn by turn with HF ``generate`` and a hand-written calculator;
* the SFT labels of a hand-built demonstration are exactly the model's turns;
* the tool demo's settings come from one place and lose to the user's; bad env.* settings and env
  runs that cannot work are errors naming the key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

# tiny: the model learns too little to call the tool (the rates of scripted episodes are checked below)
TINY = ["--data", "tool-demo[num_sft=64,num_rl=32,num_sft_eval=8]", "sft.epochs=1", "rl.iterations=2",
        "rl.rollout_batch_size=4", "data.num_eval=8", "data.num_valid=4", "model.hidden_size=32", "model.num_layers=1",
        "model.intermediate_size=64"]


# --------------------------------------------------------------------------------------------
# The run, end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_run(rlhf, tmp_path_factory):
    out = tmp_path_factory.mktemp("tool") / "out"
    proc = rlhf(["run", "--stage", "all", "--out", str(out), *TINY], timeout=600)
    return proc, out


def _recount(episodes: list[dict], tok) -> dict[str, float]:
    """The rates of ``rlhf_data.tool_demo.tool_use_stats``, recounted from the episodes' token ids: a call
    is an episode that ended with a final answer after an environment turn; its result is the number in
    that turn's ``<result>``; the answer is the last model turn's text."""
    called = wrong_copy = right = 0
    for e in episodes:
        if e["end_reason"] != "done":
            continue
        answer = tok.decode(e["turns"][-1][1], skip_special_tokens=True).strip()
        a, b = e["meta"]["a"], e["meta"]["b"]
        right += bool(re.fullmatch(r"-?\d+", answer)) and int(answer) == a + b
        env = [tok.decode(ids) for role, ids in e["turns"] if role == "env"]
        if env:
            called += 1
            wrong_copy += answer != re.fullmatch(r"<result>(\d+)</result>", env[0]).group(1)
    n = len(episodes)
    return {"tool_call_rate": called / n, "copy_error_rate": wrong_copy / max(called, 1), "verifier_score": right / n}


def _greedy_episode(model, tok, prompt: list[int], meta: dict) -> list[list]:
    """One greedy episode with HF ``generate`` and a calculator written here (env.* of the tool demo:
    2 turns of at most 20 tokens, 60 after the prompt; one call)."""
    import torch

    ids, turns, calls = list(prompt), [], 0
    for _ in range(2):
        cap = min(20, 60 - (len(ids) - len(prompt)))
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=cap, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id) + 1]
        turns.append(["model", out])
        ids += out
        m = re.search(r"<calc>\s*(\d+)\s*\+\s*(\d+)\s*</calc>", tok.decode(out, skip_special_tokens=True))
        if m is None or calls == 1 or len(ids) - len(prompt) >= 60:
            break
        calls += 1
        reply = tok.encode(f"<result>{int(m.group(1)) + int(m.group(2))}</result>", add_special_tokens=False)
        if len(ids) - len(prompt) + len(reply) >= 60:
            break
        turns.append(["env", reply])
        ids += reply
    return turns


def test_run_sft_then_grpo_with_rates_from_the_episodes(tool_run, explain) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc, out = tool_run
    assert proc.returncode == 0, explain(proc)
    assert "tool demo: running sft -> grpo; no reward-model stage" in proc.stdout + proc.stderr, explain(proc)
    assert not (out / "rm").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["wall_seconds"]) == {"sft", "grpo", "total"}
    g = summary["grpo"]
    tok = AutoTokenizer.from_pretrained(out / "grpo")
    for tag in ("before", "after"):
        episodes = [json.loads(x) for x in (out / "grpo" / f"eval_episodes_{tag}.jsonl").read_text().splitlines()]
        assert len(episodes) == 8
        rates = _recount(episodes, tok)
        for k, v in rates.items():
            assert g[f"{k}_{tag}"] == pytest.approx(v, abs=1e-9), (tag, k, g, rates)
    # the "after" episodes are the saved model's greedy episodes, turn by turn
    model = AutoModelForCausalLM.from_pretrained(out / "grpo").eval()
    for e in episodes:
        assert _greedy_episode(model, tok, e["prompt_ids"], e["meta"]) == e["turns"], e
    # per-iteration env metrics in metrics.jsonl
    rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in rows if r.get("iteration", 0) >= 1 and "reward_mean" in r]
    assert len(it) == 2
    for r in it:
        assert r["env_turns_mean"] >= 1
        ends = sum(v for k, v in r.items() if k.startswith("env_end_"))
        assert ends == 4 * 4  # rollout_batch_size x samples_per_prompt trajectories, each one reason


class _ScriptedActor:
    """A policy whose turns are written by ``script(context_text) -> text`` (then EOS), for RePrefillSession."""

    def __init__(self, tok, script) -> None:
        self.tok, self.script = tok, script

    def eval(self) -> None: ...

    def train(self) -> None: ...

    def generate(self, ids, mask, *, max_new_tokens, eos_token_id, pad_token_id, return_logprobs, **sampling):
        import torch

        rows = [self.tok.encode(self.script(self.tok.decode(r[m.bool()].tolist())), add_special_tokens=False)
                + [eos_token_id] for r, m in zip(ids, mask, strict=True)]
        width = max(map(len, rows))
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([ids, new], dim=1), torch.zeros(new.shape)


def test_held_out_rates_of_scripted_episodes(tmp_path) -> None:
    """Four held-out problems answered by a script: a right call copied right, a right call copied wrong,
    no call and a wrong answer, no call and the right answer. By hand: tool_call_rate 2/4, copy_error_rate
    1/2, verifier_score 2/4; the saved episodes give the same by the recount."""
    from rlhf_cli.config import load_config
    from rlhf_cli.context import Context
    from rlhf_cli.env_stage import EnvEvaluator
    from rlhf_cli.report import Reporter
    from rlhf_data import PromptRecord, StageData, train_demo_tokenizer

    problems = [(12345, 6789), (23456, 7890), (34567, 8901), (45678, 9012)]
    tok = train_demo_tokenizer([f"Human: What is {a} + {b}?\n\nAssistant: <calc>{a}+{b}</calc><result>{a + b}</result>"
                                f"{a + b}" for a, b in problems] * 3)

    def script(context: str) -> str:
        a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)", context)[0])
        k = [p[0] for p in problems].index(a)
        result = re.search(r"<result>(\d+)</result>", context)
        if k >= 2:  # no call: wrong (k = 2) or right (k = 3) from the head
            return str(a + b + (1 if k == 2 else 0))
        return f"<calc>{a}+{b}</calc>" if result is None else (result.group(1) if k == 0 else result.group(1)[::-1])

    held = [PromptRecord(f"What is {a} + {b}?", {"a": a, "b": b}) for a, b in problems]
    cfg = load_config(None, [f"out={tmp_path}", "data.cache=false", "algo.name=grpo"], **{"data.sources": "tool-demo"})
    ev = EnvEvaluator(Context(cfg, Reporter(enabled=False)), tok, StageData(rl_valid=held, rl_eval=held),
                      _ScriptedActor(tok, script))
    got = ev.held_out("before")
    assert got["tool_call_rate_before"] == 0.5 and got["copy_error_rate_before"] == 0.5, got
    assert got["verifier_score_before"] == 0.5 and got["env_turns_mean_before"] == (2 + 2 + 1 + 1) / 4, got
    episodes = [json.loads(x) for x in (tmp_path / "grpo" / "eval_episodes_before.jsonl").read_text().splitlines()]
    assert _recount(episodes, tok) == {"tool_call_rate": 0.5, "copy_error_rate": 0.5, "verifier_score": 0.5}
    assert ev.validate() == 0.5


# --------------------------------------------------------------------------------------------
# SFT labels of a hand-built demonstration
# --------------------------------------------------------------------------------------------


def test_sft_labels_are_the_model_turns_only(tmp_path) -> None:
    from rlhf_cli.config import load_config
    from rlhf_cli.context import Context
    from rlhf_cli.multiturn_sft import sft_examples
    from rlhf_cli.report import Reporter
    from rlhf_data import SFTRecord, collate_sft, render_prompt, train_demo_tokenizer

    turns = [["model", "<calc>12345+6789</calc>"], ["tool", "<result>19134</result>"], ["model", "19134"]]
    q = "What is 12345 + 6789?"
    tok = train_demo_tokenizer([f"Human: {q}\n\nAssistant: <calc>12345+6789</calc><result>19134</result>19134"] * 4)
    cfg = load_config(None, [f"out={tmp_path}", "data.cache=false"], **{"data.sources": "tool-demo"})
    ctx = Context(cfg, Reporter(enabled=False))
    stats: dict = {}
    [ex] = sft_examples(ctx, tok, [SFTRecord(q, "19134", {"turns": turns})], "sft", stats)

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    eos, no = tok.eos_token_id, -100
    prompt = enc(render_prompt(tok, q))
    m1, t1, m2 = enc(turns[0][1]), enc(turns[1][1]), enc(turns[2][1])
    assert ex["input_ids"] == prompt + m1 + [eos] + t1 + m2 + [eos]
    assert ex["labels"] == [no] * len(prompt) + m1 + [eos] + [no] * len(t1) + m2 + [eos]
    # collate_sft keeps the example's own labels (right-padded with -100 beside a longer row)
    longer = {"input_ids": ex["input_ids"] + [5, 6], "prompt_len": 1}
    b = collate_sft([ex, longer], tok.pad_token_id)
    assert b["labels"][0].tolist() == ex["labels"] + [no, no]
    assert b["labels"][1].tolist() == [no] + longer["input_ids"][1:]


# --------------------------------------------------------------------------------------------
# Settings in one place, and errors
# --------------------------------------------------------------------------------------------


def test_tool_demo_settings_are_defaults_that_the_user_overrides() -> None:
    import yaml
    from rlhf_cli.config import load_config, resolved_settings
    from rlhf_cli.tool_demo_preset import TOOL_DEMO_SETTINGS

    cfg = load_config(None, [], **{"data.sources": "tool-demo"})
    for key, value in TOOL_DEMO_SETTINGS.items():
        section, name = key.split(".")
        got = dict(cfg.algo.options)[name] if section == "algo" and name != "name" else getattr(getattr(cfg, section), name)
        assert got == value, key
    assert load_config(None, ["model.hidden_size=64", "env.max_turns=3"], **{"data.sources": "tool-demo"}).model.hidden_size == 64
    ppo = load_config(None, ["algo.name=ppo"], **{"data.sources": "tool-demo[num_sft=10]"})
    assert ppo.algo.name == "ppo" and ppo.env.name == "calculator" and ppo.algo.options == ()
    assert load_config(None).env.name == ""  # the built-in demo is untouched
    # configs/tool-demo.yaml is the resolved config of --data tool-demo (scripts/gen_config_docs.py)
    path = Path(__file__).resolve().parents[1] / "configs" / "tool-demo.yaml"
    assert yaml.safe_load(path.read_text())["data"]["sources"] == "tool-demo"
    assert resolved_settings(load_config(str(path))) == resolved_settings(cfg)


@pytest.mark.parametrize(("overrides", "needles"), [
    (["env.name=nope"], ["env.name", "unknown environment 'nope'", "calculator"]),
    (["env.max_turns=0"], ["env.max_turns", "0", ">= 1"]),
    (["env.max_total_tokens=-3"], ["env.max_total_tokens", "-3", ">= 1"]),
    (["env.name=calculator", "algo.name=dpo"], ["env.name", "'dpo' is not an online algorithm"]),
    (["env.name=calculator", "algo.name=grpo", "rl.reward=model"], ["env.name", "rl.reward='model'"]),
])
def test_bad_env_settings(overrides: list[str], needles: list[str]) -> None:
    from rlhf_cli.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


@pytest.fixture
def no_training(monkeypatch):
    from rlhf_cli import pipeline

    def started(*args, **kwargs):
        raise AssertionError("a stage started: the bad setting was not caught before training")

    for name in ("run_sft", "run_rm", "run_online", "run_offline"):
        monkeypatch.setattr(pipeline, name, started)


@pytest.mark.usefixtures("in_process_world", "no_training")
@pytest.mark.parametrize(("args", "needle"), [
    (["--stage", "rm", "--data", "tool-demo"], "--stage rm: the tool demo"),
    (["--stage", "all", "--data", "tool-demo", "env.name="], "env.name: the tool demo"),
    (["--stage", "all", "--data", "tool-demo", "rl.ptx_coef=0.5"], "rl.ptx_coef: 0.5 is not supported on the tool demo"),
    (["--stage", "all", "--data", "tool-demo[num_sft=-1]"], "option num_sft=-1 is not allowed; allowed: >= 1"),
    (["--stage", "all", "--data", "tool-demo[num_rl=0]"], "option num_rl=0 is not allowed; allowed: >= 1"),
    (["--stage", "all", "--data", "tool-demo[num_eval=-5]"], "option num_eval=-5 is not allowed; allowed: >= 1"),
    (["--stage", "all", "--data", "tool-demo[copy_error=0.9]"], "skip_tool/copy_error/wrong_operands"),
    (["--stage", "grpo", "--data", "LOCAL", "algo.name=grpo", "rl.reward=verifier", "env.name=calculator"],
     "env.name: 'calculator' needs data with a ground-truth verifier"),
])
def test_env_runs_that_cannot_work(tmp_path, args: list[str], needle: str) -> None:
    from rlhf_cli.app import app

    local = tmp_path / "sft.jsonl"
    local.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"r{i}"}) + "\n" for i in range(40)))
    args = [str(local) if a == "LOCAL" else a for a in args]
    result = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code != 0, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.output
