"""``rlhf chat`` (issue 14, part 6): the demo tokenizer's chat template, multi-turn history, streaming,
the generation flags, and the interactive mode driven through a real terminal (tmux).

The references are independent of the chat code: prompts written out by hand in the plain
"Human:/Assistant:" format the pipeline trains on, and replies from HF ``generate`` on those prompts.
The model is conftest.py's ``letters_model``, a tiny random Llama whose output layer can only pick
letter tokens (every other row of ``lm_head`` is zero, so a letter always has the highest logit), so
replies are printable, never end early, and differ from prompt to prompt.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch

Q1, Q2, SYSTEM = "What is 1 + 2?", "What is 3 + 4?", "Answer with a number."
N_NEW = 6  # --max-new-tokens of the CLI runs


def plain(*turns: str, system: str | None = None) -> str:
    """The training format, by hand: user and assistant turns alternate, the last is the user's."""
    parts = [system] if system else []
    parts += [f"{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)]
    return "\n\n".join(parts) + "\n\nAssistant:"


def messages(*turns: str, system: str | None = None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def hf_reply(model, tok, prompt_text: str, max_new_tokens: int = N_NEW, **sampling) -> str:
    """HF generate on the hand-written prompt (greedy unless ``sampling``), decoded and stripped."""
    ids = torch.tensor([tok(prompt_text)["input_ids"]])
    kw = sampling or {"do_sample": False}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


@pytest.fixture(scope="module")
def replies(letters_model) -> dict[str, str]:
    """Greedy replies by HF generate: turn 1, turn 2 with turn 1 as history, turn 2 alone."""
    _, tok, model = letters_model
    r1 = hf_reply(model, tok, plain(Q1))
    out = {"r1": r1, "r2": hf_reply(model, tok, plain(Q1, r1, Q2)), "r2_alone": hf_reply(model, tok, plain(Q2))}
    assert all(re.fullmatch(r"[A-Za-z]+", r) for r in out.values()), out
    assert out["r2"] != out["r2_alone"], f"the history changes nothing for this model: {out}"
    return out


# --------------------------------------------------------------------------------------------
# the demo tokenizer's chat template
# --------------------------------------------------------------------------------------------
CONVERSATIONS = {"one turn": ((Q1,), None), "system": ((Q1,), SYSTEM), "history": ((Q1, "3", Q2), None),
                 "history and system": ((Q1, "3", Q2, "7", "What is 10 + 20?"), SYSTEM)}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_demo_template_gives_the_training_prompt_ids(name: str, letters_model) -> None:
    from rlhf_data import encode_prompt

    turns, system = CONVERSATIONS[name]
    tok = letters_model[1]  # saved and loaded back: the template travels with the tokenizer
    msgs = messages(*turns, system=system)
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == plain(*turns, system=system)
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids == tok(plain(*turns, system=system))["input_ids"] == encode_prompt(tok, tuple(msgs))


def test_demo_template_renders_a_whole_sample_as_the_training_text(demo_tok) -> None:
    from rlhf_data import encode_pair

    msgs = messages(Q1, "3", Q2, "7", system=SYSTEM)
    text = demo_tok.apply_chat_template(msgs, tokenize=False)
    assert text == plain(Q1, "3", Q2, system=SYSTEM) + " 7<eos>"
    assert demo_tok.decode(encode_pair(demo_tok, tuple(msgs[:-1]), "7")["input_ids"]) == text


def test_demo_template_is_saved_and_changes_no_training_ids(demo_tok, letters_model) -> None:
    from rlhf_data import PLAIN_CHAT_TEMPLATE, AdditionTask, encode_pair, uses_chat_template

    d, loaded, _ = letters_model
    assert (d / "chat_template.jinja").is_file() or "chat_template" in (d / "tokenizer_config.json").read_text()
    assert loaded.chat_template == PLAIN_CHAT_TEMPLATE and not uses_chat_template(loaded)
    bare = copy.deepcopy(demo_tok)
    bare.chat_template = None  # the demo tokenizer as it was before it had a template
    records = [(r.prompt, r.response) for r in AdditionTask().sft_records()[:40]]
    records += [(tuple(messages(f"What is {a} + 1?", str(a + 1), Q2, system=SYSTEM if a % 2 else None)), "7")
                for a in range(10)]
    for prompt, response in records:
        assert encode_pair(loaded, prompt, response) == encode_pair(bare, prompt, response), prompt


def test_a_tokenizer_with_its_own_template_renders_through_it(demo_tok, letters_model) -> None:
    from rlhf_cli.chat_session import ChatSession, GenerationSettings

    tok = copy.deepcopy(demo_tok)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    session = ChatSession(tok, letters_model[2], GenerationSettings(max_new_tokens=8), system=SYSTEM,
                          history=messages(Q1, "3"))
    ids, dropped = session.prompt_ids(Q2)
    text = f"<|system|>{SYSTEM}\n<|user|>{Q1}\n<|assistant|>3\n<|user|>{Q2}\n<|assistant|>"
    assert dropped == 0 and ids == tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# replies: streaming, history, sampling, the context limit
# --------------------------------------------------------------------------------------------
def test_streamed_replies_equal_hf_generate_turn_after_turn(letters_model, replies) -> None:
    from rlhf_cli.chat_session import ChatSession, GenerationSettings

    _, tok, model = letters_model
    session = ChatSession(tok, model, GenerationSettings(max_new_tokens=N_NEW))
    for question, expected in ((Q1, replies["r1"]), (Q2, replies["r2"])):
        pieces: list[str] = []
        reply = session.reply(question, on_text=pieces.append)
        assert "".join(pieces) == reply.text == expected
        assert len(pieces) >= 2, pieces  # it came token by token, not at the end
    assert session.history == messages(Q1, replies["r1"], Q2, replies["r2"])
    session.reset()
    assert session.reply(Q2).text == replies["r2_alone"]


def test_sampling_equals_hf_generate_with_the_same_seed(letters_model, replies) -> None:
    from rlhf_cli.chat_session import ChatSession, GenerationSettings

    _, tok, model = letters_model
    session = ChatSession(tok, model, GenerationSettings(max_new_tokens=12, temperature=1.5, top_p=0.8))
    torch.manual_seed(7)
    ours = session.reply(Q1).text
    torch.manual_seed(7)
    assert ours == hf_reply(model, tok, plain(Q1), 12, do_sample=True, temperature=1.5, top_p=0.8, top_k=None)
    assert ours != hf_reply(model, tok, plain(Q1), 12)  # it did sample


def test_stream_holds_back_split_characters_and_trailing_space(demo_tok) -> None:
    from rlhf_cli.chat_session import TextStream, reply_text

    ids = demo_tok(" héllo wörld ✓ \n")["input_ids"]
    assert len(ids) > len("héllo wörld ✓"), "expected multi-byte characters split over byte tokens"
    pieces: list[str] = []
    stream = TextStream(demo_tok, pieces.append)
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt: not shown
    for i in ids:
        stream.put(torch.tensor([i]))
    stream.end()
    assert "".join(pieces) == reply_text(demo_tok, ids) == "héllo wörld ✓"
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > 3


def test_oldest_turns_are_dropped_to_fit_the_context(letters_model) -> None:
    from rlhf_cli.chat_session import ChatSession, ContextError, GenerationSettings

    _, tok, model = letters_model
    history = messages(*[t for a in range(6) for t in (f"What is {a} + {a}?", str(2 * a))])
    context = model.config.max_position_embeddings
    for max_new in (40, 80, 100, 110):
        session = ChatSession(tok, model, GenerationSettings(max_new_tokens=max_new), history=list(history))
        keep = next(k for k in range(6, -1, -1)  # the most recent turns that fit, counted by hand
                    if len(tok(plain(*[m["content"] for m in history[12 - 2 * k :]], Q2))["input_ids"])
                    <= context - max_new)
        ids, dropped = session.prompt_ids(Q2)
        assert dropped == 6 - keep and ids == tok(plain(*[m["content"] for m in history[12 - 2 * keep :]], Q2))["input_ids"]
        reply = session.reply(Q2)
        assert session.history == history[12 - 2 * keep :] + messages(Q2, reply.text)
    session = ChatSession(tok, model, GenerationSettings(max_new_tokens=context - 3), history=list(history))
    with pytest.raises(ContextError, match=r"--max-new-tokens 125 .* context of 128 tokens"):
        session.reply(Q2)
    assert session.history == history  # untouched


def test_the_truncation_notice(letters_model, capsys) -> None:
    from rlhf_cli.chat import run_turn
    from rlhf_cli.chat_session import ChatSession, GenerationSettings

    _, tok, model = letters_model
    session = ChatSession(tok, model, GenerationSettings(max_new_tokens=100),
                          history=messages(*[t for a in range(4) for t in (f"What is {a} + {a}?", str(2 * a))]))
    assert run_turn(session, Q2, show_prompt=False, lead="model> ")
    err = capsys.readouterr().err
    assert re.search(r"dropped the oldest \d turn\(s\) to fit the model's context of 128 tokens", err), err


# --------------------------------------------------------------------------------------------
# the command: one answer, piped input, a terminal session
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_one_answer_equals_hf_generate(system, letters_model, in_process_world) -> None:
    from rlhf_cli.app import app
    from typer.testing import CliRunner

    d, tok, model = letters_model
    args = ["chat", "--model", str(d), "--prompt", Q1, "--max-new-tokens", str(N_NEW), "--show-prompt"]
    result = CliRunner().invoke(app, args + (["--system", system] if system else []))
    assert result.exit_code == 0, result.output
    assert result.stdout == hf_reply(model, tok, plain(Q1, system=system)) + "\n"
    assert repr(plain(Q1, system=system)) in result.stderr


def test_piped_session_keeps_history_and_obeys_commands(letters_model, replies, cli_tools) -> None:
    d = letters_model[0]
    proc = subprocess.run([sys.executable, "-m", "rlhf_cli", "chat", "--model", str(d), "--max-new-tokens", str(N_NEW)],
                          input=f"{Q1}\n\n{Q2}\n/reset\n/nonsense\n{Q2}\n/exit\n{Q1}\n", capture_output=True, text=True,
                          env=cli_tools[0](), timeout=300)
    assert proc.returncode == 0, proc.stderr
    answers = re.findall(r"model> (.*)", proc.stdout)
    assert answers == [replies["r1"], replies["r2"], replies["r2_alone"]], proc.stdout
    assert "(history cleared)" in proc.stderr and "unknown command '/nonsense'" in proc.stderr


def _wait_for(pane, pattern: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = pane()
        if re.search(pattern, text, re.S):
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"the terminal never showed {pattern!r} in {timeout} s; it shows:\n{text}")
        time.sleep(0.5)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed: the terminal session test "
                    "drives `rlhf chat` through tmux (apt-get install tmux)")
def test_terminal_session_through_tmux(letters_model, replies, tmp_path, cli_tools) -> None:
    d = letters_model[0]
    script = tmp_path / "chat.sh"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in cli_tools[0]().items() if re.fullmatch(r"\w+", k))
    cmd = shlex.join([sys.executable, "-m", "rlhf_cli", "chat", "--model", str(d), "--max-new-tokens", str(N_NEW),
                      "--show-prompt"])
    script.write_text(f"{exports}{cmd}\necho CHAT-EXITED-$?\nsleep 600\n")
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    subprocess.run([*tmux, "new-session", "-d", "-x", "220", "-y", "60", "-s", "chat", f"bash {script}"], check=True)

    def pane() -> str:  # the screen and its scroll-back, wrapped lines joined, blank ends trimmed
        shown = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-500", "-t", "chat"],
                               capture_output=True, text=True, check=True).stdout
        return "\n".join(line.rstrip() for line in shown.splitlines()).strip()

    def say(text: str | None) -> None:
        if text is None:
            subprocess.run([*tmux, "send-keys", "-t", "chat", "C-d"], check=True)
        else:
            subprocess.run([*tmux, "send-keys", "-t", "chat", "-l", text], check=True)
            subprocess.run([*tmux, "send-keys", "-t", "chat", "Enter"], check=True)

    try:
        _wait_for(pane, r"you>$")
        say(Q1)
        _wait_for(pane, rf"model> {replies['r1']}\nyou>$")
        say(Q2)
        text = _wait_for(pane, rf"model> {replies['r2']}\nyou>$")
        assert repr(plain(Q1, replies["r1"], Q2)) in text, text  # --show-prompt: the history is in the prompt
        say("/reset")
        _wait_for(pane, r"\(history cleared\)\nyou>$")
        say(Q2)
        text = _wait_for(pane, rf"(.*model> ){{3}}{replies['r2_alone']}\nyou>$")
        assert text.count(repr(plain(Q2))) == 1, text
        say(None)  # Ctrl-D: end of input
        _wait_for(pane, r"CHAT-EXITED-0")
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)  # our own server (its own socket): the pane goes too


@pytest.mark.parametrize("fmt", ["sequence_classification", "value_head"])
def test_a_reward_model_is_refused_by_name(fmt, letters_model, tmp_path, in_process_world) -> None:
    """A reward model (either saved format) would load as a causal LM with a fresh output layer and answer
    gibberish: chat refuses it, naming the option and the head it found."""
    from rlhf_cli.app import app
    from rlhf_hybrid import ValueModel, save_hf_checkpoint
    from typer.testing import CliRunner

    d, tok, model = letters_model
    rm_dir = tmp_path / "rm"
    if fmt == "sequence_classification":
        value = ValueModel(model)
        save_hf_checkpoint(value, value.state_dict(), str(rm_dir), tok)
    else:  # the older format: the causal LM plus value_head.safetensors
        from safetensors.torch import save_file

        model.save_pretrained(rm_dir)
        tok.save_pretrained(rm_dir)
        save_file({"v_head.weight": torch.zeros(1, model.config.hidden_size)}, str(rm_dir / "value_head.safetensors"))
    result = CliRunner().invoke(app, ["chat", "--model", str(rm_dir), "--prompt", Q1])
    assert result.exit_code != 0
    assert f"--model: {str(rm_dir)!r} is a reward model ({fmt.replace('_', ' ')} head)" in result.output
