"""The demo task, the tokenizer and the collators, checked against independent references.

Rates (carry errors, label noise) are recomputed here from the operands with plain arithmetic,
never from the task's own bookkeeping; collator outputs are written out by hand.
"""

from __future__ import annotations

import pytest
import torch
from rlhf_data import (
    IGNORE_INDEX,
    AdditionTask,
    AdditionTaskConfig,
    TokenizeConfig,
    collate_pairs,
    collate_prompts,
    collate_sft,
    encode_pair,
    encode_prompt,
    encode_response,
    train_demo_tokenizer,
)

SPLITS = ("sft", "rm", "rl", "valid", "eval")


def carries(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


@pytest.fixture(scope="module")
def task() -> AdditionTask:
    return AdditionTask()


@pytest.fixture(scope="module")
def tokenizer(task):
    return train_demo_tokenizer(task.corpus())


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


def test_splits_are_disjoint_and_cover_every_problem(task) -> None:
    c = task.config
    sets = {s: set(task.problems(s)) for s in SPLITS}
    for s in SPLITS:
        assert len(sets[s]) == len(task.problems(s)), f"{s} has duplicate problems"
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1 :]:
            assert not sets[s] & sets[t], f"splits {s} and {t} share problems"
    every = {(a, b) for a in range(c.low, c.high + 1) for b in range(c.low, c.high + 1)}
    assert set().union(*sets.values()) == every
    assert len(sets["eval"]) == c.num_eval and len(sets["valid"]) == c.num_valid
    # stage_split (0.4, 0.3, 0.3) of the 8100 - 500 remaining problems
    assert (len(sets["sft"]), len(sets["rm"]), len(sets["rl"])) == (3040, 2280, 2280)


def test_splits_and_records_are_deterministic() -> None:
    a, b = AdditionTask(AdditionTaskConfig(seed=7)), AdditionTask(AdditionTaskConfig(seed=7))
    for s in SPLITS:
        assert a.problems(s) == b.problems(s)
    assert [(r.prompt, r.response) for r in a.sft_records()] == [(r.prompt, r.response) for r in b.sft_records()]
    assert [(r.chosen, r.rejected) for r in a.preference_records()] == [
        (r.chosen, r.rejected) for r in b.preference_records()
    ]
    other = AdditionTask(AdditionTaskConfig(seed=8))
    assert other.problems("eval") != a.problems("eval")


def test_unknown_split_names_the_choices(task) -> None:
    with pytest.raises(ValueError, match="'train'.*allowed"):
        task.problems("train")


def test_prompt_records_carry_the_operands(task) -> None:
    for r, (a, b) in zip(task.prompt_records("valid"), task.problems("valid"), strict=True):
        assert r.prompt == f"What is {a} + {b}?"
        assert r.meta == {"a": a, "b": b}


# --------------------------------------------------------------------------------------------
# SFT demonstrations: the carry error
# --------------------------------------------------------------------------------------------


def test_sft_forgets_the_carry_at_the_configured_rate(task) -> None:
    wrong_carry = wrong_plain = n_carry = n_plain = 0
    for r in task.sft_records("sft"):
        a, b = r.meta["a"], r.meta["b"]
        answer = int(r.response)
        if carries(a, b):
            n_carry += 1
            assert answer in (a + b, a + b - 10), (a, b, answer)  # right, or the carry forgotten
            wrong_carry += answer != a + b
        else:
            n_plain += 1
            wrong_plain += answer != a + b
    # About 45% of problems carry (45 of the 100 units-digit pairs), so ~1370 carry questions: the
    # binomial standard deviation of the rate is ~0.012; 0.05 is four of them.
    assert n_carry > 1000
    assert abs(wrong_carry / n_carry - 0.7) < 0.05
    assert wrong_plain == 0 and n_plain > 1000


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_sft_carry_error_extremes(rate: float) -> None:
    task = AdditionTask(AdditionTaskConfig(sft_carry_error=rate))
    for r in task.sft_records("sft"):
        a, b = r.meta["a"], r.meta["b"]
        expected = a + b - 10 if (carries(a, b) and rate == 1.0) else a + b
        assert int(r.response) == expected


# --------------------------------------------------------------------------------------------
# preference pairs: label noise
# --------------------------------------------------------------------------------------------


def test_preference_label_noise_rate(task) -> None:
    pairs = task.preference_records("rm")
    assert len(pairs) == 2 * len(task.problems("rm"))  # pairs_per_prompt = 2
    flipped = 0
    for p in pairs:
        a, b = p.meta["a"], p.meta["b"]
        right = str(a + b)
        # exactly one side of every pair is the right answer
        assert (p.chosen == right) != (p.rejected == right), p
        flipped += p.chosen != right
        assert p.meta["flipped"] == (p.chosen != right)
    # 4560 pairs: the standard deviation of the rate is ~0.0044; 0.02 is over four of them.
    assert abs(flipped / len(pairs) - 0.1) < 0.02


# --------------------------------------------------------------------------------------------
# verifier
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [("85", 1.0), (" 85 ", 1.0), ("85\n", 1.0), ("75", 0.0), ("eighty", 0.0), ("", 0.0), ("85 apples", 0.0),
     ("8 5", 0.0), ("-85", 0.0), ("850", 0.0)],
)
def test_verifier_by_hand(response: str, expected: float) -> None:
    assert AdditionTask.verify(response, {"a": 47, "b": 38}) == expected


# --------------------------------------------------------------------------------------------
# collators
# --------------------------------------------------------------------------------------------


def test_collate_prompts_pads_on_the_left() -> None:
    b = collate_prompts([{"input_ids": [5, 6, 7], "meta": {"a": 1}}, {"input_ids": [8]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["meta"] == [{"a": 1}, {}]
    assert b["input_ids"].dtype == torch.long


def test_collate_sft_masks_prompt_and_padding() -> None:
    ex = [{"input_ids": [5, 6, 7, 8], "prompt_len": 2}, {"input_ids": [9, 10, 11], "prompt_len": 1}]
    b = collate_sft(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]  # right padding
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    X = IGNORE_INDEX
    assert b["labels"].tolist() == [[X, X, 7, 8], [X, 10, 11, X]]
    unmasked = collate_sft(ex, pad_id=0, mask_prompt=False)
    assert unmasked["labels"].tolist() == [[5, 6, 7, 8], [9, 10, 11, X]]


def test_collate_pairs_stacks_chosen_then_rejected() -> None:
    ex = [{"chosen_ids": [1, 2, 3], "rejected_ids": [1, 4]}, {"chosen_ids": [5], "rejected_ids": [6, 7, 8, 9]}]
    b = collate_pairs(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [1, 4, 0, 0], [6, 7, 8, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<eos>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("text", ["Human: What is 47 + 38?\n\nAssistant: 85", "What is 10 + 99?", " 123", "x\ty ü"])
def test_tokenizer_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_splits_digits_one_per_token(tokenizer) -> None:
    text = "Human: What is 47 + 38?\n\nAssistant: 1085 and 9990"
    pieces = [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert digits == list("47381085" "9990"), pieces


def test_encode_pair_is_prompt_then_response_then_eos(tokenizer) -> None:
    enc = encode_pair(tokenizer, "What is 47 + 38?", "85")
    p = encode_prompt(tokenizer, "What is 47 + 38?")
    assert enc["prompt_len"] == len(p)
    assert enc["input_ids"][: len(p)] == p
    assert enc["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(p) == "Human: What is 47 + 38?\n\nAssistant:"
    assert tokenizer.decode(enc["input_ids"][len(p) : -1]) == " 85"


def test_length_limits(tokenizer) -> None:
    cfg = TokenizeConfig(max_prompt_len=3, max_response_len=2)
    full = encode_prompt(tokenizer, "What is 47 + 38?")
    assert encode_prompt(tokenizer, "What is 47 + 38?", cfg) == full[-3:]  # keeps the question's end
    r = encode_response(tokenizer, "12345", cfg)
    assert len(r) == 2 and tokenizer.eos_token_id not in r  # truncated: no EOS taught mid-answer
    assert encode_response(tokenizer, "1", TokenizeConfig(max_response_len=3))[-1] == tokenizer.eos_token_id
