"""The tool demo's tokenization: copying the calculator's result must be a token copy.

The digit ids are looked up in the vocabulary by their one-character token string (ByteLevel maps
the ASCII digits to themselves), independently of ``encode``; the numbers are written out here.
"""

from __future__ import annotations

import pytest
from rlhf_data import train_demo_tokenizer
from rlhf_data.tool_demo import RESULT, ToolAdditionTask, ToolTaskConfig


@pytest.fixture(scope="module")
def task() -> ToolAdditionTask:
    return ToolAdditionTask(ToolTaskConfig(num_sft=300, num_rl=10, num_eval=50, seed=3))


@pytest.fixture(scope="module")
def tok(task):
    return train_demo_tokenizer(task.corpus())


def test_the_corpus_is_each_demonstration_in_the_plain_chat_format(task) -> None:
    corpus, demos = task.corpus(), task.demonstrations()
    assert len(corpus) == 300
    q, turns, _ = demos[0]
    assert corpus[0] == "Human: " + q + "\n\nAssistant: " + "".join(t for _, t in turns)
    a, b = task.splits["sft"][0]
    assert corpus[0].startswith(f"Human: What is {a} + {b}?\n\nAssistant: ")


def test_every_digit_is_one_token_and_the_answer_ids_are_the_result_digit_ids(task, tok) -> None:
    digit_id = {d: tok.convert_tokens_to_ids(d) for d in "0123456789"}
    assert len(set(digit_id.values())) == 10 and tok.unk_token_id not in digit_id.values()
    # hand-picked sums (4, 5 and 6 digits, repeated digits that a BPE merge would like) and held-out ones
    sums = [2000, 19134, 99999, 100000, 111111, 123456] + [m["a"] + m["b"] for _, m in task.prompts("eval")]
    for s in sums:
        want = [digit_id[d] for d in str(s)]
        answer = tok.encode(str(s), add_special_tokens=False)
        result = tok.encode(RESULT.format(s), add_special_tokens=False)
        assert answer == want, s
        # <result> and </result> are whole tokens around exactly the answer's ids
        assert result[1:-1] == answer and tok.decode(result[:1]) == "<result>" and tok.decode(result[-1:]) == "</result>"
    calc = tok.encode("<calc>12345+6789</calc>", add_special_tokens=False)
    assert calc[1:6] == [digit_id[d] for d in "12345"] and calc[7:11] == [digit_id[d] for d in "6789"]
    assert tok.decode(calc[6:7]) == "+"
    prompt = tok.encode("Human: What is 12345 + 6789?\n\nAssistant: ", add_special_tokens=False)
    digits = [i for i in prompt if i in digit_id.values()]
    assert digits == [digit_id[d] for d in "123456789"]
