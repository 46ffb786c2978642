"""Stage splits, blending, tokenization limits and cache, packing — against hand-worked references."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from rlhf_data import (
    IGNORE_INDEX,
    DataError,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    StageSplit,
    TokenizeConfig,
    blend,
    build_stage_data,
    collate_packed,
    pack_sft,
    render_prompt,
    split_groups,
    tokenize_records,
)
from rlhf_data.testing import write_rows

STAGES = ("sft", "rm", "rl")


def pairs_file(tmp_path, n: int, name: str = "pairs.jsonl", dup_every: int = 0):
    """``n`` rows of prompt/chosen/rejected; with ``dup_every``, that many rows share each prompt."""
    rows = [{"prompt": f"q{i // dup_every if dup_every else i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(n)]
    return write_rows(tmp_path / name, rows)


def row_ids(records) -> list[int]:
    return [r.meta["row"] for r in records]


# --------------------------------------------------------------------------------------------
# stage split
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "needle"), [
    ("2,x,4", "the rm part 'x' is not a number"),
    ("0,0,0", "not all zero"),
    ("1,2", "three comma-separated parts"),
    ("1,2,3,4", "three comma-separated parts"),
    ("-1,2,3", "non-negative"),
    ("nan,1,1", "non-negative"),
])
def test_bad_split_strings(text, needle) -> None:
    with pytest.raises(DataError) as e:
        StageSplit.parse(text)
    assert "data.split" in str(e.value) and needle in str(e.value)


def test_split_property_disjoint_covering_stable(tmp_path) -> None:
    """For random split strings and seeds: the parts are disjoint, cover the source (with the eval
    part), keep prompts together, and are identical when the source is loaded again."""
    rng = random.Random(0)
    f = pairs_file(tmp_path, 240, dup_every=3)  # 80 prompts, 3 pairs each
    for _ in range(25):
        parts = [rng.choice([0, 0.5, 1, 2, 3, 4, 7]) for _ in range(3)]
        if sum(parts) == 0:
            parts[rng.randrange(3)] = 1
        split = ",".join(f"{p:g}" for p in parts)
        seed = rng.randrange(10_000)
        eval_fraction = rng.choice([0.0, 0.1, 0.25])
        kw = dict(split=split, seed=seed, eval_fraction=eval_fraction, max_eval=10_000)
        a, b = build_stage_data(f"local:{f}", **kw), build_stage_data(f"local:{f}", **kw)
        ids = {s: row_ids(getattr(a, s)) for s in STAGES} | {"eval": row_ids(a.sft_eval)}
        every = [i for v in ids.values() for i in v]
        assert sorted(every) == list(range(1, 241)), (split, seed)  # disjoint and covering
        for s in (*STAGES, "sft_eval", "rl_valid", "rl_eval"):
            assert row_ids(getattr(a, s)) == row_ids(getattr(b, s)), (split, seed, s)  # stable
        owner = {}
        for part, v in ids.items():
            for i in v:
                owner.setdefault((i - 1) // 3, set()).add(part)
        assert all(len(p) == 1 for p in owner.values()), "a prompt's rows landed in two parts"
        # sizes follow the split (in prompts, to within one prompt per part)
        n_eval = round(80 * eval_fraction)
        assert abs(len(ids["eval"]) / 3 - n_eval) <= 1
        fr = StageSplit.parse(split).fractions()
        for s, share in zip(STAGES, fr, strict=True):
            assert abs(len(ids[s]) / 3 - (80 - len(ids["eval"]) / 3) * share) <= 1.0 + 1e-9, (split, s)
        # held-out prompts split into validation / eval for RL, disjoint
        assert not set(row_ids(a.rl_valid)) & set(row_ids(a.rl_eval))
        assert sorted(row_ids(a.rl_valid) + row_ids(a.rl_eval)) == sorted(ids["eval"])


def test_split_does_not_depend_on_other_sources(tmp_path) -> None:
    """Mixing in another source changes how many of a source's samples are used, never which stage
    a row belongs to."""
    f, g = pairs_file(tmp_path, 60), pairs_file(tmp_path, 30, "other.jsonl")
    alone = build_stage_data(f"local:{f}", split="2,4,4", seed=3)
    mixed = build_stage_data(f"local:{f}:2,local:{g}", split="2,4,4", seed=3, sizes={"sft": 1000})
    label = f"local:{f.name}"
    for s in (*STAGES, "sft_eval"):
        mine = set(row_ids([r for r in getattr(mixed, s) if r.meta["source"] == label]))
        assert mine and mine <= set(row_ids(getattr(alone, s))), s


def test_split_groups_hand_checked() -> None:
    recs = [PromptRecord(f"p{i % 4}", meta={"i": i}) for i in range(8)]  # 4 prompts, 2 rows each
    parts = split_groups(recs, [0.5, 0.5, 0.0], seed=1)
    assert [len(p) for p in parts] == [4, 4, 0]
    for p in parts:
        prompts = Counter(r.prompt for r in p)
        assert all(c == 2 for c in prompts.values())


# --------------------------------------------------------------------------------------------
# blending
# --------------------------------------------------------------------------------------------
def test_blend_three_to_one_within_two_percent_over_10k() -> None:
    a = [("a", i) for i in range(9000)]
    b = [("b", i) for i in range(6000)]
    mixed, counts = blend({"a": a, "b": b}, {"a": 0.75, "b": 0.25}, seed=7, size=10_000)
    assert len(mixed) == 10_000
    share = sum(1 for src, _ in mixed if src == "a") / len(mixed)
    assert abs(share - 0.75) <= 0.02
    assert counts == {"a": 7500, "b": 2500}
    # the order is mixed too: every 1000-sample window is near 3:1
    for w in range(0, 10_000, 1000):
        window = mixed[w : w + 1000]
        assert abs(sum(1 for s, _ in window if s == "a") / 1000 - 0.75) < 0.06
    assert len(set(mixed)) == 10_000  # nothing repeated while the sources suffice


def test_blend_through_the_spec_with_file_sources(tmp_path) -> None:
    f = pairs_file(tmp_path, 12_000, "big.jsonl")
    g = pairs_file(tmp_path, 8_000, "small.jsonl")
    data = build_stage_data(f"local:{f}:3,local:{g}:1", split="1,0,0", eval_fraction=0.0, sizes={"sft": 10_000})
    by = Counter(r.meta["source"] for r in data.sft)
    assert len(data.sft) == 10_000
    assert abs(by["local:big.jsonl"] / 10_000 - 0.75) <= 0.02
    rep = {r.label: r.used["sft"] for r in data.reports}
    assert rep == {"local:big.jsonl": 7500, "local:small.jsonl": 2500}
    again = build_stage_data(f"local:{f}:3,local:{g}:1", split="1,0,0", eval_fraction=0.0, sizes={"sft": 10_000})
    assert [(r.meta["source"], r.meta["row"]) for r in again.sft] == [(r.meta["source"], r.meta["row"]) for r in data.sft]
    other = build_stage_data(f"local:{f}:3,local:{g}:1", split="1,0,0", eval_fraction=0.0, sizes={"sft": 10_000},
                             seed=99)
    assert [r.meta["row"] for r in other.sft] != [r.meta["row"] for r in data.sft]


def test_blend_default_size_uses_the_scarcest_source_whole() -> None:
    # weights 1:1, a has 100, b has 30 -> 60 samples: all 30 of b, 30 of a
    mixed, counts = blend({"a": list(range(100)), "b": list(range(1000, 1030))}, {"a": 1, "b": 1}, seed=0)
    assert counts == {"a": 30, "b": 30}
    assert sorted(x for x in mixed if x >= 1000) == list(range(1000, 1030))


def test_blend_oversamples_only_when_asked() -> None:
    mixed, counts = blend({"a": [1, 2, 3]}, {"a": 1}, seed=0, size=7)
    assert counts == {"a": 7} and sorted(Counter(mixed).values()) == [2, 2, 3]


# --------------------------------------------------------------------------------------------
# tokenization: formats, limits, cache
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byt5():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()  # one token per byte, ids = byte + 3; EOS </s> = 1; adds EOS to single texts


def test_plain_multi_turn_rendering(byt5) -> None:
    prompt = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"})
    assert render_prompt(byt5, prompt) == "Be brief.\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"
    assert render_prompt(byt5, "Hi") == "Human: Hi\n\nAssistant:"


def test_chat_template_is_used_when_the_tokenizer_has_one() -> None:
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"})
    assert render_prompt(tok, prompt) == "<user>Hi<assistant>Yo<user>?<assistant>"


def test_limits_truncate_and_count(byt5) -> None:
    # prompt "Human: abcdef\n\nAssistant:" = 25 bytes + </s> = 26 tokens; response " 12345" = 6 bytes + EOS = 7
    recs = [SFTRecord("abcdef", "12345"), SFTRecord("a", "1")]
    cfg = TokenizeConfig(max_prompt_len=20, max_response_len=5)
    out = tokenize_records(byt5, recs, "sft", cfg)
    st = out.stats
    assert st.prompt_lens == [26, 21] and st.response_lens == [7, 3]
    assert (st.truncated_prompt, st.truncated_response, st.dropped_prompt, st.dropped_response, st.kept) == (2, 1, 0, 0, 2)
    first = out.examples[0]
    full_prompt = [b + 3 for b in b"Human: abcdef\n\nAssistant:"] + [1]
    assert first["input_ids"][:20] == full_prompt[-20:]  # the prompt keeps its last tokens
    assert first["input_ids"][20:] == [b + 3 for b in b" 1234"]  # first 5 response tokens, no EOS
    assert first["prompt_len"] == 20
    second = out.examples[1]
    assert second["input_ids"][-3:] == [ord(" ") + 3, ord("1") + 3, 1]  # short response keeps its EOS


def test_limits_drop_and_count(byt5) -> None:
    recs = [SFTRecord("abcdef", "1"), SFTRecord("a", "123456789"), SFTRecord("a", "1")]
    cfg = TokenizeConfig(max_prompt_len=22, max_response_len=5, truncation="drop")
    out = tokenize_records(byt5, recs, "sft", cfg)
    assert (out.stats.dropped_prompt, out.stats.dropped_response, out.stats.kept) == (1, 1, 1)
    assert len(out.examples) == 1


def test_pairs_and_prompts_formats(byt5) -> None:
    out = tokenize_records(byt5, [PreferenceRecord("a", "x", "yz", meta={"k": 1})], "rm")
    (e,) = out.examples
    p = [b + 3 for b in b"Human: a\n\nAssistant:"] + [1]
    assert e["chosen_ids"] == p + [ord(" ") + 3, ord("x") + 3, 1]
    assert e["rejected_ids"] == p + [ord(" ") + 3, ord("y") + 3, ord("z") + 3, 1]
    assert e["prompt_len"] == len(p) and e["meta"] == {"k": 1}
    (q,) = tokenize_records(byt5, [PromptRecord("a", meta={"k": 2})], "rl").examples
    assert q == {"input_ids": p, "meta": {"k": 2}}


def test_collate_pairs_marks_response_tokens() -> None:
    from rlhf_data import collate_pairs

    b = collate_pairs([{"chosen_ids": [5, 6, 7, 1], "rejected_ids": [5, 6, 8, 9, 1], "prompt_len": 2},
                       {"chosen_ids": [4, 7, 1], "rejected_ids": [4, 1], "prompt_len": 1}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 0], [4, 7, 1, 0, 0], [5, 6, 8, 9, 1], [4, 1, 0, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


def test_bad_truncation_policy() -> None:
    with pytest.raises(ValueError, match=r"truncation: 'cut' is not allowed; allowed: 'truncate', 'drop'"):
        TokenizeConfig(truncation="cut")


def test_cache_reuses_by_content_fingerprint(tmp_path, byt5) -> None:
    recs = [SFTRecord(f"q{i}", f"a{i}") for i in range(50)]
    cfg = TokenizeConfig(max_prompt_len=64, max_response_len=8)
    first = tokenize_records(byt5, recs, "sft", cfg, cache_dir=tmp_path)
    assert not first.stats.cache_hit and len(list(tmp_path.glob("*.json"))) == 1
    second = tokenize_records(byt5, recs, "sft", cfg, cache_dir=tmp_path)
    assert second.stats.cache_hit and second.examples == first.examples
    assert second.examples == tokenize_records(byt5, recs, "sft", cfg).examples  # uncached reference
    # any change of content, limits or stage misses
    assert not tokenize_records(byt5, recs[:-1], "sft", cfg, cache_dir=tmp_path).stats.cache_hit
    assert not tokenize_records(byt5, recs, "sft", TokenizeConfig(64, 4), cache_dir=tmp_path).stats.cache_hit
    changed = [SFTRecord("q0", "a0!")] + recs[1:]
    assert not tokenize_records(byt5, changed, "sft", cfg, cache_dir=tmp_path).stats.cache_hit
    # a damaged file is rebuilt, not trusted
    for f in tmp_path.glob("*.json"):
        f.write_text("{not json")
    again = tokenize_records(byt5, recs, "sft", cfg, cache_dir=tmp_path)
    assert not again.stats.cache_hit and again.examples == first.examples
    assert tokenize_records(byt5, recs, "sft", cfg, cache_dir=tmp_path).stats.cache_hit


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------
def test_pack_sft_layout_by_hand() -> None:
    ex = [{"input_ids": [1, 2, 3], "prompt_len": 2}, {"input_ids": [4, 5], "prompt_len": 1},
          {"input_ids": [6, 7, 8, 9], "prompt_len": 2}]
    rows = pack_sft(ex, max_len=6)
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1], "loss_mask": [0, 0, 1, 0, 1]},
        {"input_ids": [6, 7, 8, 9], "position_ids": [0, 1, 2, 3], "loss_mask": [0, 0, 1, 1]},
    ]
    b = collate_packed(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    X = IGNORE_INDEX
    assert b["labels"].tolist() == [[X, X, 3, X, 5], [X, X, 8, 9, X]]
    with pytest.raises(ValueError, match="example 0 has 3 tokens, more than max_len=2"):
        pack_sft(ex, max_len=2)


def test_packed_logprobs_equal_unpacked_on_a_tiny_llama() -> None:
    """Packed rows (attention_mask=None + restarting position ids) give every token the same
    log-prob as running each example alone — transformers keeps attention inside each example."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.eval()
    g = torch.Generator().manual_seed(1)
    ex = [{"input_ids": torch.randint(3, 50, (n,), generator=g).tolist(), "prompt_len": 2} for n in (5, 7, 4, 6)]
    rows = pack_sft(ex, max_len=12)
    assert len(rows) == 2
    b = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        # use_cache=False: transformers only reads packed positions when there is no KV cache
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits.log_softmax(-1)
        row_of, start = 0, 0
        for e in ex:
            ids = torch.tensor([e["input_ids"]])
            alone = model(input_ids=ids).logits.log_softmax(-1)[0]
            n = ids.shape[1]
            if start + n > len(rows[row_of]["input_ids"]):
                row_of, start = row_of + 1, 0
            torch.testing.assert_close(packed[row_of, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_same_file_name_in_two_folders_are_two_sources(tmp_path) -> None:
    a = pairs_file(tmp_path / "a", 30, "x.jsonl")
    b = pairs_file(tmp_path / "b", 30, "x.jsonl")
    data = build_stage_data(f"local:{a},local:{b}", split="1,0,0", eval_fraction=0.0)
    assert [r.label for r in data.reports] == [f"local:{a}", f"local:{b}"]
    assert Counter(r.meta["source"] for r in data.sft) == {f"local:{a}": 30, f"local:{b}": 30}
