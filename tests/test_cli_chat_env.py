"""``rlhf chat --env NAME`` (issue 16, item 5): a model plays episodes against a registered environment.

The references are independent of the chat and the rollout code: the prompt written out by hand in
the plain "Human:/Assistant:" format, each model turn by HF ``generate`` (greedy) continued on the
exact token sequence so far (prompt ids, then each turn's ids, then the ids of the environment's
reply, tokenized on its own), and the rewards from a fresh instance of the environment stepped on
those turns. The model is conftest.py's ``letters_model`` (letters only, never EOS: every turn is
``--max-new-tokens`` long).

The environment of the multi-turn checks is a plugin registered the way a package registers one: a
module and a ``*.dist-info`` with its ``entry_points.txt`` on ``sys.path`` (no pip install), so the
CLI finds it through the entry-point group ``rlhf.environments``.
"""

from __future__ import annotations

import re
import textwrap

import pytest
import torch

N_NEW = 5  # --max-new-tokens: tokens per model turn
TASK = "Count my letters."

PLUGIN = textwrap.dedent('''
    from rlhf_algos.environments import StepResult


    class CountEnv:
        name = "count"
        description = "test: replies with each turn's length; step fail_at raises"

        def __init__(self, fail_at: int = 0, silent: bool = False) -> None:
            self.fail_at, self.silent = fail_at, silent

        def reset(self, record):
            self.record, self.turn = record, 0

        def step(self, action):
            self.turn += 1
            if self.turn == self.fail_at:
                raise RuntimeError(f"step {self.turn} failed on purpose")
            # "an" right after a turn ending in "t" merges into the token "tan" when the text is re-tokenized
            reply = None if self.silent else f"an echo of {len(action)} letters, {self.record.get('tag')!r}."
            return StepResult(reply=reply,
                              reward=self.turn + len(action) / 100, info={"turn": self.turn})
''')


@pytest.fixture(scope="module")
def count_env(tmp_path_factory):
    """The plugin's directory (to put on ``sys.path``) and its class, imported independently of the CLI."""
    import importlib.util

    d = tmp_path_factory.mktemp("count_env_plugin")
    (d / "rlhf_test_count_env.py").write_text(PLUGIN)
    info = d / "rlhf_test_count_env-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rlhf-test-count-env\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[rlhf.environments]\ncount = rlhf_test_count_env:CountEnv\n")
    spec = importlib.util.spec_from_file_location("count_env_reference", d / "rlhf_test_count_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return d, module.CountEnv


def plain(task: str) -> str:
    return f"Human: {task}\n\nAssistant:"


def hf_turn(model, tok, seq: list[int], **sampling) -> list[int]:
    """One turn by HF generate on ``seq`` (greedy unless ``sampling``), up to and including EOS."""
    x = torch.tensor([seq])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=N_NEW,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             **(sampling or {"do_sample": False}))
    return out[0, len(seq):].tolist()


def reference_episode(model, tok, env, task: str, record: dict, max_turns: int, **sampling):
    """``([(who, text) shown], [StepResult of each turn], ids, is_model)``: HF generate turn by turn on one
    growing token sequence ``ids`` (the prompt's, then each turn's and each reply's; ``is_model`` marks the
    turns' ids); the episode ends when the environment says done or after ``max_turns`` turns."""
    seq = tok(plain(task))["input_ids"]
    is_model = [False] * len(seq)
    env.reset({**record, "prompt": plain(task)})
    shown, results = [], []
    for t in range(max_turns):
        new = hf_turn(model, tok, seq, **sampling)
        assert sampling or (tok.eos_token_id not in new and len(new) == N_NEW)  # greedy, it never stops early
        text = tok.decode(new, skip_special_tokens=True)
        shown.append(("model", text.strip()))
        seq, is_model = seq + new, is_model + [True] * len(new)
        results.append(env.step(text))
        if results[-1].done or t == max_turns - 1:
            break
        reply = tok.encode(results[-1].reply or "", add_special_tokens=False)
        if reply:
            shown.append(("env", tok.decode(reply, skip_special_tokens=True).strip()))
        seq, is_model = seq + reply, is_model + [False] * len(reply)
    return shown, results, seq, is_model


def invoke(args: list[str], input: str | None = None):
    from rlhf_cli.app import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, ["chat", *args], input=input)


def shown_turns(stdout: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^(model|env)> (.*)$", stdout, flags=re.M)]


def test_turns_rewards_and_end_equal_hf_generate_against_the_environment(letters_model, count_env, monkeypatch,
                                                                         in_process_world) -> None:
    d, tok, model = letters_model
    monkeypatch.syspath_prepend(str(count_env[0]))
    expected, results, seq, _ = reference_episode(model, tok, count_env[1](), TASK, {"tag": 7}, max_turns=3)
    assert [w for w, _ in expected] == ["model", "env", "model", "env", "model"]
    # the check can fail: re-tokenizing the text gives other ids, and the environment's ids change the next turn
    assert tok(tok.decode(seq))["input_ids"] != seq
    first = tok(plain(TASK))["input_ids"] + hf_turn(model, tok, tok(plain(TASK))["input_ids"])
    assert tok.decode(hf_turn(model, tok, first)).strip() != expected[2][1]
    result = invoke(["--model", str(d), "--env", "count", "--meta", "tag=7", "--max-turns", "3", "--prompt", TASK,
                     "--max-new-tokens", str(N_NEW)])
    assert result.exit_code == 0, result.output
    assert shown_turns(result.stdout) == expected
    assert "'7'" not in result.stdout and "letters, 7." in result.stdout  # --meta tag=7 reached reset as the int 7
    env_tokens = sum(len(tok.encode(r.reply, add_special_tokens=False)) for r in results[:-1])
    assert f"end: max_turns after 3 model turns; {3 * N_NEW} model + {env_tokens} environment tokens" in result.stdout
    (line,) = re.findall(r"^reward: (\S+) \(turn rewards: (.*)\)$", result.stdout, flags=re.M)
    assert float(line[0]) == pytest.approx(results[-1].reward, abs=1e-5)  # the last step's reward is the final one
    assert [float(r) for r in line[1].split(", ")] == pytest.approx([r.reward for r in results[:-1]], abs=1e-5)
    assert "info: turn=3" in result.stdout


def test_turns_without_replies_keep_their_own_rewards(letters_model, count_env, monkeypatch, in_process_world) -> None:
    """An environment that says nothing between turns: the model's turns follow each other directly, and each
    non-final turn's reward is still listed (from where its turn ended, not from the masks)."""
    d, tok, model = letters_model
    monkeypatch.syspath_prepend(str(count_env[0]))
    expected, results, *_ = reference_episode(model, tok, count_env[1](silent=True), TASK, {}, max_turns=3)
    assert [w for w, _ in expected] == ["model"] * 3
    result = invoke(["--model", str(d), "--env", "count", "--env-arg", "silent=true", "--max-turns", "3",
                     "--prompt", TASK, "--max-new-tokens", str(N_NEW)])
    assert result.exit_code == 0, result.output
    assert shown_turns(result.stdout) == expected
    (final, turns) = re.findall(r"^reward: (\S+) \(turn rewards: (.*)\)$", result.stdout, flags=re.M)[0]
    assert float(final) == pytest.approx(results[-1].reward, abs=1e-5)
    assert [float(r) for r in turns.split(", ")] == pytest.approx([r.reward for r in results[:-1]], abs=1e-5)
    assert f"end: max_turns after 3 model turns; {3 * N_NEW} model + 0 environment tokens" in result.stdout


def test_the_episode_is_the_token_sequence_of_a_training_rollout(letters_model, count_env, monkeypatch, capsys) -> None:
    """The episode runner behind the command returns the trajectory: its ids are the reference's one token
    sequence (never a re-tokenization of the text) and its loss mask covers exactly the model's turns."""
    from rlhf_cli.chat_env import EnvOptions, EpisodeRunner, environment_factory
    from rlhf_cli.chat_session import GenerationSettings

    d, tok, model = letters_model
    monkeypatch.syspath_prepend(str(count_env[0]))
    _, results, seq, is_model = reference_episode(model, tok, count_env[1](), TASK, {}, max_turns=3)
    run = EpisodeRunner(tok, model, GenerationSettings(max_new_tokens=N_NEW), EnvOptions("count", max_turns=3),
                        environment_factory("count", {}))
    batch = run(TASK)
    P = batch.prompt_len
    assert batch.sequences[0][batch.attention_mask[0].bool()].tolist() == seq
    n = len(seq) - P
    assert batch.loss_mask[0, :n].bool().tolist() == is_model[P:] and batch.loss_mask[0, n:].sum() == 0
    assert batch.scores.tolist() == pytest.approx([results[-1].reward]) and batch.end_reasons == ["max_turns"]
    assert "model> " in capsys.readouterr().out


def test_sampled_episode_equals_hf_generate_with_the_same_seed(letters_model, count_env, monkeypatch, capsys) -> None:
    """At --temperature > 0 the turns are HF generate's samples with the same seed, and the kept sampling
    log-probs are the model's log-softmax(logits / T) of the sampled tokens recomputed on the whole sequence."""
    from rlhf_cli.chat_env import EnvOptions, EpisodeRunner, environment_factory
    from rlhf_cli.chat_session import GenerationSettings

    d, tok, model = letters_model
    monkeypatch.syspath_prepend(str(count_env[0]))
    T = 1.5
    torch.manual_seed(11)
    _, _, seq, is_model = reference_episode(model, tok, count_env[1](), TASK, {}, 3, do_sample=True, temperature=T,
                                            top_p=0.9, top_k=None)
    run = EpisodeRunner(tok, model, GenerationSettings(max_new_tokens=N_NEW, temperature=T, top_p=0.9),
                        EnvOptions("count", max_turns=3), environment_factory("count", {}))
    torch.manual_seed(11)
    batch = run(TASK)
    assert batch.sequences[0][batch.attention_mask[0].bool()].tolist() == seq
    greedy, *_ = reference_episode(model, tok, count_env[1](), TASK, {}, 3)
    assert tok.decode(seq[batch.prompt_len:], skip_special_tokens=True) != "".join(t for _, t in greedy)  # it sampled
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1].float() / T  # (L - 1, V): position i predicts i + 1
    lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    P, n = batch.prompt_len, len(seq) - batch.prompt_len
    mine = torch.tensor(is_model[P:])
    assert torch.allclose(batch.sample_logprobs[0, :n][mine], lp[P - 1:][mine], atol=1e-4)
    assert batch.sample_logprobs[0, :n][~mine].abs().sum() == 0
    capsys.readouterr()


def test_an_environment_that_raises_ends_the_episode_with_its_reason(letters_model, count_env, monkeypatch,
                                                                     in_process_world) -> None:
    d, tok, model = letters_model
    monkeypatch.syspath_prepend(str(count_env[0]))
    expected, results, *_ = reference_episode(model, tok, count_env[1](), TASK, {}, max_turns=2)
    result = invoke(["--model", str(d), "--env", "count", "--env-arg", "fail_at=2", "--prompt", TASK,
                     "--max-new-tokens", str(N_NEW)])
    assert result.exit_code == 0, result.output  # a recorded end, not a crash
    assert shown_turns(result.stdout) == expected  # the two turns the environment saw, one reply between
    assert re.search(r"^end: env_error after 2 model turns; .*\(RuntimeError: step 2 failed on purpose\)$",
                     result.stdout, flags=re.M), result.stdout
    (final, turns) = re.findall(r"^reward: (\S+) \(turn rewards: (.*)\)$", result.stdout, flags=re.M)[0]
    assert float(final) == 0.0 and float(turns) == pytest.approx(results[0].reward, abs=1e-5)
    assert "info:" not in result.stdout  # the failed step has none


def test_a_reply_over_the_total_budget_ends_the_episode(letters_model, count_env, monkeypatch, in_process_world) -> None:
    d, tok, model = letters_model
    monkeypatch.syspath_prepend(str(count_env[0]))
    expected, results, *_ = reference_episode(model, tok, count_env[1](), TASK, {}, max_turns=1)
    reply = tok.encode(results[0].reply, add_special_tokens=False)
    result = invoke(["--model", str(d), "--env", "count", "--prompt", TASK, "--max-new-tokens", str(N_NEW),
                     "--max-total-tokens", str(N_NEW + len(reply))])  # the reply would leave no room for a turn
    assert result.exit_code == 0, result.output
    assert shown_turns(result.stdout) == expected  # the refused reply is not shown: the model never saw it
    assert f"end: reply_over_budget after 1 model turn; {N_NEW} model + 0 environment tokens after the prompt " \
           f"(reply of {len(reply)} tokens)" in result.stdout
    assert re.search(rf"^reward: {results[0].reward:.6g}$", result.stdout, flags=re.M), result.stdout


def test_the_calculator_verifies_the_answer(letters_model, in_process_world) -> None:
    from rlhf_algos.calculator import CalculatorEnv

    d, tok, model = letters_model
    question = "What is 12345 + 6789?"
    env = CalculatorEnv()
    expected, results, *_ = reference_episode(model, tok, env, question, {"a": 12345, "b": 6789}, max_turns=4)
    (r,) = results  # letters are no tool call: the first turn is the (wrong) final answer
    result = invoke(["--model", str(d), "--env", "calculator", "--prompt", question, "--max-new-tokens", str(N_NEW)])
    assert result.exit_code == 0, result.output
    assert shown_turns(result.stdout) == expected
    assert "end: done after 1 model turn;" in result.stdout
    assert f"reward: {r.reward:g}\n" in result.stdout and r.info["correct"] == 0.0
    assert f"info: tool_result=None answer={r.info['answer']!r} correct=0.0" in result.stdout


def test_piped_tasks_are_one_episode_each(letters_model, in_process_world) -> None:
    d = letters_model[0]
    result = invoke(["--model", str(d), "--env", "calculator", "--max-new-tokens", str(N_NEW)],
                    input="What is 1 + 2?\n\n/nonsense\nWhat is 1 + 2?\n/exit\nWhat is 3 + 4?\n")
    assert result.exit_code == 0, result.output
    turns = re.findall(r"model> (.*)", result.stdout)
    assert len(turns) == 2 and turns[0] == turns[1], result.stdout  # a fresh episode each time, same task
    assert result.stdout.count("end: done after 1 model turn;") == 2
    assert "unknown command '/nonsense'" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--env", "no-such-env"], r"--env: unknown environment 'no-such-env'; available: .*calculator"),
    (["--env", "calculator", "--env-arg", "nope=1"], r"--env-arg: environment 'calculator' refuses \{'nope': 1\}"),
    (["--env", "calculator", "--env-arg", "max_calls=-1"], r"--env-arg: .*max_calls: -1 is not allowed"),
    (["--env", "calculator", "--env-arg", "max_calls"], r"--env-arg: 'max_calls' is not allowed; allowed: KEY=VALUE"),
    (["--env", "calculator", "--meta", "a=1", "--meta", "a=2"], r"--meta: 'a' is given twice"),
    (["--env", "calculator", "--max-turns", "0"], r"--max-turns: 0 is not allowed; allowed: an integer >= 1"),
    (["--env", "calculator", "--max-total-tokens", "-3"], r"--max-total-tokens: -3 is not allowed"),
    (["--max-turns", "2"], r"--max-turns: only with --env NAME"),
    (["--meta", "a=2"], r"--meta: only with --env NAME"),
    (["--env", "calculator", "--max-total-tokens", "500"],
     r"--max-total-tokens: 500 tokens after a prompt of \d+ exceed the model's context of 128 tokens"),
])
def test_bad_flags_are_refused_by_name(args, message, letters_model, in_process_world) -> None:
    result = invoke(["--model", str(letters_model[0]), "--prompt", "What is 1 + 2?", *args])
    assert result.exit_code == 2, result.output
    assert re.search("error: " + message, result.stderr), result.stderr

