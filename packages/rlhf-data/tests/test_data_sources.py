"""Every source adapter, offline, on local files written in the dataset's real schema.

Expected records are written out by hand from the rows (never produced by the adapters).
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from rlhf_data import (
    ChatRecord,
    DataError,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    available_sources,
    build_stage_data,
    get_source,
    parse_data_spec,
    parse_transcript,
)
from rlhf_data.sources import read_rows
from rlhf_data.testing import write_rows

U = "user"
A = "assistant"


def load(spec: str, **kw):
    """(train records, eval records or None, report) of one source."""
    from rlhf_data.stages import load_records

    (sp,) = parse_data_spec(spec)
    return load_records(sp, **kw)


def same(records, expected) -> None:
    assert [type(r) for r in records] == [type(e) for e in expected]
    assert records == expected  # meta is excluded from equality


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
BUILTINS = {"demo", "hh", "rm-static", "full-hh-rlhf", "synthetic-instruct-gptj-pairwise", "yitingxie", "webgpt",
            "shp", "ultrafeedback", "sharegpt", "messages", "local"}


def test_builtins_are_registered_through_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="rlhf.data.sources")}
    assert BUILTINS <= names
    assert BUILTINS <= set(available_sources())


def test_hub_ids_resolve_to_their_adapter() -> None:
    assert get_source("Anthropic/hh-rlhf").name == "hh"
    assert get_source("stanfordnlp/SHP").name == "shp"
    assert get_source("HuggingFaceH4/ultrafeedback_binarized").name == "ultrafeedback"


def test_unknown_source_lists_the_available_ones() -> None:
    with pytest.raises(DataError) as e:
        parse_data_spec("hh-rlhf-typo:0.5")
    msg = str(e.value)
    assert "'hh-rlhf-typo'" in msg
    for name in BUILTINS:
        assert name in msg


def test_third_party_adapter_plugs_in_through_the_entry_point_group(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "my_rlhf_plugin.py"
    pkg.write_text(textwrap.dedent('''
        from rlhf_data import SFTRecord, SourceAdapter
        from rlhf_data.sources import text_field

        class QA(SourceAdapter):
            name = "qa"
            columns = ("q", "a")
            eval_split = None
            def convert(self, row):
                return SFTRecord(text_field(row, "q"), text_field(row, "a"))
    '''))
    dist = tmp_path / "my_rlhf_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rlhf-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[rlhf.data.sources]\nqa = my_rlhf_plugin:QA\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "qa" in available_sources(refresh=True)
        f = write_rows(tmp_path / "qa.jsonl", [{"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": "6"}])
        train, evals, _ = load(f"qa:{f}")
        same(train, [SFTRecord("2+2?", "4"), SFTRecord("3+3?", "6")])
    finally:
        monkeypatch.undo()
        sys.modules.pop("my_rlhf_plugin", None)
        available_sources(refresh=True)


# --------------------------------------------------------------------------------------------
# HH-style transcripts
# --------------------------------------------------------------------------------------------
def test_parse_transcript_multi_turn() -> None:
    text = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: What is a Human: tag?\n\nAssistant:"
    assert parse_transcript(text) == (
        {"role": U, "content": "Hi"},
        {"role": A, "content": "Hello! How can I help?"},
        {"role": U, "content": "What is a Human: tag?"},
    )


def test_hh(tmp_path) -> None:
    rows = [
        {"chosen": "\n\nHuman: What is a dog?\n\nAssistant: A domesticated canine.",
         "rejected": "\n\nHuman: What is a dog?\n\nAssistant: No idea."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a color.\n\nAssistant: Blue.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a color.\n\nAssistant: Dog."},
        # identical answers: dropped and counted, not an error
        {"chosen": "\n\nHuman: Q\n\nAssistant: Same.", "rejected": "\n\nHuman: Q\n\nAssistant: Same."},
        # an empty final answer (HH has some): dropped
        {"chosen": "\n\nHuman: Q2\n\nAssistant:", "rejected": "\n\nHuman: Q2\n\nAssistant: Something."},
    ]
    f = write_rows(tmp_path / "hh.jsonl", rows)
    train, evals, report = load(f"hh:{f}")
    assert evals is None  # a local file has no eval split of its own
    same(train, [
        PreferenceRecord("What is a dog?", "A domesticated canine.", "No idea."),
        PreferenceRecord(({"role": U, "content": "Hi"}, {"role": A, "content": "Hello"},
                          {"role": U, "content": "Name a color."}), "Blue.", "Dog."),
    ])
    assert report.rows == 4
    assert dict(report.dropped) == {"chosen == rejected": 1, "empty final answer": 1}
    assert train[1].meta == {"source": f"hh:{f.name}", "row": 2}


@pytest.mark.parametrize("name", ["rm-static", "full-hh-rlhf"])
def test_dahoas_rm_static_and_full_hh(tmp_path, name) -> None:
    rows = [
        {"prompt": "\n\nHuman: What is a dog?\n\nAssistant:", "response": " A domesticated canine.",
         "chosen": " A domesticated canine.", "rejected": " No idea."},
        {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a color.\n\nAssistant:", "response": " Blue.",
         "chosen": " Blue.", "rejected": " Dog."},
    ]
    f = write_rows(tmp_path / "d.parquet", rows)
    train, _, _ = load(f"{name}:{f}")
    same(train, [
        PreferenceRecord("What is a dog?", "A domesticated canine.", "No idea."),
        PreferenceRecord(({"role": U, "content": "Hi"}, {"role": A, "content": "Hello"},
                          {"role": U, "content": "Name a color."}), "Blue.", "Dog."),
    ])


def test_synthetic_instruct_gptj_pairwise(tmp_path) -> None:
    rows = [{"prompt": "Name a dog breed.", "chosen": "The beagle.", "rejected": "A cat."}]
    f = write_rows(tmp_path / "s.json", rows)
    train, _, _ = load(f"synthetic-instruct-gptj-pairwise:{f}")
    same(train, [PreferenceRecord("Name a dog breed.", "The beagle.", "A cat.")])
    assert get_source("synthetic-instruct-gptj-pairwise").eval_split is None  # train split only on the hub


def test_yitingxie(tmp_path) -> None:
    rows = [{"prompt": "\n\nHuman: What is a dog?\n\n", "chosen": "Assistant: A domesticated canine.",
             "rejected": "Assistant: No idea."}]
    train, _, _ = load(f"yitingxie:{write_rows(tmp_path / 'y.jsonl', rows)}")
    same(train, [PreferenceRecord("What is a dog?", "A domesticated canine.", "No idea.")])


def test_webgpt_comparisons_ties_dropped(tmp_path) -> None:
    rows = [
        {"question": {"full_text": "Why is the sky blue?", "id": "q1"}, "quotes_0": {}, "answer_0": "Rayleigh scattering.",
         "tokens_0": [], "score_0": 1.0, "quotes_1": {}, "answer_1": "Because it is.", "tokens_1": [], "score_1": -1.0},
        {"question": {"full_text": "Why do cats purr?", "id": "q2"}, "quotes_0": {}, "answer_0": "Joy.",
         "tokens_0": [], "score_0": -0.5, "quotes_1": {}, "answer_1": "To communicate.", "tokens_1": [], "score_1": 0.5},
        {"question": {"full_text": "Tie?", "id": "q3"}, "quotes_0": {}, "answer_0": "A", "tokens_0": [], "score_0": 0.0,
         "quotes_1": {}, "answer_1": "B", "tokens_1": [], "score_1": 0.0},
    ]
    train, _, report = load(f"webgpt:{write_rows(tmp_path / 'w.jsonl', rows)}")
    same(train, [PreferenceRecord("Why is the sky blue?", "Rayleigh scattering.", "Because it is."),
                 PreferenceRecord("Why do cats purr?", "To communicate.", "Joy.")])
    assert dict(report.dropped) == {"tie": 1}


def test_shp_score_based_pairs(tmp_path) -> None:
    base = {"post_id": "p", "domain": "askscience_train", "upvote_ratio": 0.9, "c_root_id_A": "a", "c_root_id_B": "b",
            "created_at_utc_A": 1, "created_at_utc_B": 2, "seconds_difference": 1.0}
    rows = [
        {**base, "history": "Why is the sky blue?", "human_ref_A": "Rayleigh scattering.", "human_ref_B": "Magic.",
         "score_A": 52, "score_B": 3, "labels": 1, "score_ratio": 17.33},
        {**base, "history": "Why is the sky blue?", "human_ref_A": "Aliens.", "human_ref_B": "Light scatters.",
         "score_A": 4, "score_B": 6, "labels": 0, "score_ratio": 1.5},
        {**base, "history": "Tie", "human_ref_A": "x", "human_ref_B": "y", "score_A": 5, "score_B": 5, "labels": 0,
         "score_ratio": 1.0},
    ]
    f = write_rows(tmp_path / "shp.csv", rows)  # csv: scores arrive as text
    train, _, report = load(f"shp:{f}")
    same(train, [PreferenceRecord("Why is the sky blue?", "Rayleigh scattering.", "Magic."),
                 PreferenceRecord("Why is the sky blue?", "Light scatters.", "Aliens.")])
    assert dict(report.dropped) == {"tie": 1}
    train2, _, report2 = load(f"shp:{f}[min_score_ratio=2]")
    same(train2, train[:1])
    assert report2.dropped["score ratio below min_score_ratio"] == 1


def test_ultrafeedback_binarized(tmp_path) -> None:
    rows = [{
        "prompt": "Name a dog breed.", "prompt_id": "x",
        "chosen": [{"role": "user", "content": "Name a dog breed."}, {"role": "assistant", "content": "The beagle."}],
        "rejected": [{"role": "user", "content": "Name a dog breed."}, {"role": "assistant", "content": "A cat."}],
        "messages": [{"role": "user", "content": "Name a dog breed."}, {"role": "assistant", "content": "The beagle."}],
        "score_chosen": 8.0, "score_rejected": 2.0,
    }, {
        "prompt": "Go on.", "prompt_id": "y",
        "chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go on."},
                   {"role": "assistant", "content": "Done."}],
        "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go on."},
                     {"role": "assistant", "content": "No."}],
        "messages": [], "score_chosen": 5.0, "score_rejected": 1.0,
    }]
    train, _, _ = load(f"ultrafeedback:{write_rows(tmp_path / 'uf.parquet', rows)}")
    same(train, [PreferenceRecord("Name a dog breed.", "The beagle.", "A cat."),
                 PreferenceRecord(({"role": "system", "content": "Be brief."}, {"role": U, "content": "Go on."}),
                                  "Done.", "No.")])
    assert get_source("ultrafeedback").train_split == "train_prefs"


def test_sharegpt_and_messages(tmp_path) -> None:
    share = [{"id": "x1", "conversations": [{"from": "system", "value": "Be kind."},
                                            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                            {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye!"}]}]
    msgs = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    t1, _, _ = load(f"sharegpt:{write_rows(tmp_path / 's.jsonl', share)}")
    t2, _, _ = load(f"messages:{write_rows(tmp_path / 'm.json', msgs)}")
    same(t1, [ChatRecord(({"role": "system", "content": "Be kind."}, {"role": U, "content": "Hi"},
                          {"role": A, "content": "Hello!"}, {"role": U, "content": "Bye"},
                          {"role": A, "content": "Goodbye!"}))])
    same(t2, [ChatRecord(({"role": U, "content": "Hi"}, {"role": A, "content": "Hello!"}))])


def test_chat_records_feed_every_stage_but_rm(tmp_path) -> None:
    """A conversation gives SFT its last assistant turn (the earlier turns are the prompt) and RL its prompt."""
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"},
                          {"role": "user", "content": f"Q{i}b"}, {"role": "assistant", "content": f"A{i}b"}]}
            for i in range(20)]
    f = write_rows(tmp_path / "m.jsonl", rows)
    data = build_stage_data(f"messages:{f}", split="1,0,1", eval_fraction=0.0)
    assert data.rm == [] and len(data.sft) + len(data.rl) == 20
    s = data.sft[0]
    i = s.meta["row"] - 1
    assert s == SFTRecord(({"role": U, "content": f"Q{i}"}, {"role": A, "content": f"A{i}"},
                           {"role": U, "content": f"Q{i}b"}), f"A{i}b")
    r = data.rl[0]
    j = r.meta["row"] - 1
    assert r == PromptRecord(({"role": U, "content": f"Q{j}"}, {"role": A, "content": f"A{j}"},
                              {"role": U, "content": f"Q{j}b"}))


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_file_with_column_mapping(tmp_path, ext) -> None:
    rows = [{"question": "Name a dog breed.", "good": "The beagle.", "bad": "A cat."},
            {"question": "Name a color.", "good": "Blue.", "bad": "Dog."}]
    f = write_rows(tmp_path / f"x{ext}", rows)
    train, _, _ = load(f"local:{f}[prompt=question,chosen=good,rejected=bad]")
    same(train, [PreferenceRecord("Name a dog breed.", "The beagle.", "A cat."),
                 PreferenceRecord("Name a color.", "Blue.", "Dog.")])


def test_local_kinds_follow_the_columns(tmp_path) -> None:
    sft = write_rows(tmp_path / "sft.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    prompts = write_rows(tmp_path / "p.jsonl", [{"prompt": "Say hi."}])
    same(load(f"local:{sft}[prompt=instruction,response=output]")[0], [SFTRecord("Say hi.", "Hi.")])
    same(load(f"local:{prompts}")[0], [PromptRecord("Say hi.")])


@pytest.mark.parametrize(("row", "expected"), [
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "hh"),
    ({"prompt": "\n\nHuman: a\n\nAssistant:", "chosen": " b", "rejected": " c"}, "rm-static"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "local"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages"),
    ({"history": "a", "human_ref_A": "b", "human_ref_B": "c", "score_A": 2, "score_B": 1}, "shp"),
    ({"question": "a", "answer_0": "b", "answer_1": "c", "score_0": 1, "score_1": 0}, "webgpt"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}, "ultrafeedback"),
])
def test_bare_file_format_is_detected(tmp_path, row, expected) -> None:
    f = write_rows(tmp_path / "x.jsonl", [row])
    _, _, report = load(str(f))
    assert report.format == expected


def test_hub_code_path_on_a_local_dataset_directory(tmp_path) -> None:
    """A hub id goes through ``datasets.load_dataset``; a local dataset directory takes the same path
    (train and test splits from its files), so the code path runs offline."""
    d = tmp_path / "hh-like"
    hh = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad"}
          for i in range(6)]
    write_rows(d / "train.jsonl", hh[:4])
    write_rows(d / "test.jsonl", hh[4:])
    train, evals, report = load(f"hh:{d}")
    assert [r.prompt for r in train] == ["q0", "q1", "q2", "q3"]
    assert [r.prompt for r in evals] == ["q4", "q5"]  # the dataset's own test split is the eval part
    assert report.where == [f"{d}[train]", f"{d}[test]"]
    data = build_stage_data(f"hh:{d}", split="1,1,1")
    assert sorted(r.prompt for r in data.rm_eval) == ["q4", "q5"]
    assert {r.prompt for r in data.sft + data.rm + data.rl} == {"q0", "q1", "q2", "q3"}


# --------------------------------------------------------------------------------------------
# malformed input: the error names the file, the row and the field
# --------------------------------------------------------------------------------------------
def test_missing_column_names_file_and_columns(tmp_path) -> None:
    f = write_rows(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError) as e:
        load(f"synthetic-instruct-gptj-pairwise:{f}")
    msg = str(e.value)
    assert str(f) in msg and "'rejected'" in msg and "missing column" in msg


def test_bad_row_names_file_row_and_field(tmp_path) -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": 7, "rejected": "b"}]
    f = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load(f"synthetic-instruct-gptj-pairwise:{f}")
    msg = str(e.value)
    assert str(f) in msg and "row 2" in msg and "'chosen'" in msg and "expected text" in msg


def test_mapped_column_missing_in_a_later_row(tmp_path) -> None:
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"q": "a", "g": "b", "b": "c"}) + "\n" + json.dumps({"q": "a", "g": "b"}) + "\n")
    with pytest.raises(DataError) as e:
        load(f"local:{f}[prompt=q,chosen=g,rejected=b]")
    assert "row 2" in str(e.value) and "'b'" in str(e.value) and "missing" in str(e.value)


def test_empty_file(tmp_path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl.*is empty"):
        load(f"hh:{f}")


def test_invalid_json_line(tmp_path) -> None:
    f = tmp_path / "broken.jsonl"
    f.write_text('{"chosen": "x", "rejected": "y"}\n{"chosen": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        read_rows(f)


def test_missing_file_and_unknown_extension(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load(f"hh:{tmp_path / 'nope.jsonl'}")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unknown extension '\.txt'"):
        read_rows(tmp_path / "x.txt")


def test_all_rows_dropped_is_an_error_with_the_reasons(tmp_path) -> None:
    f = write_rows(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 3)
    with pytest.raises(DataError, match=r"no usable rows.*chosen == rejected: 3"):
        load(f"synthetic-instruct-gptj-pairwise:{f}")


def test_unknown_adapter_option(tmp_path) -> None:
    f = write_rows(tmp_path / "x.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError, match=r"unknown option\(s\) answer; allowed: prompt, response, chosen"):
        load(f"local:{f}[answer=b]")


@pytest.mark.parametrize(("spec", "needle"), [
    ("hh:-1", "weight -1 must be a positive number"),
    ("hh:0", "weight 0 must be a positive number"),
    ("hh:./x.jsonl:-0.5", "weight -0.5 must be a positive number"),
    ("hh,,shp", "empty entry"),
    ("local:./x.jsonl[prompt=q", "unbalanced '['"),
    ("hh:0.5,hh:0.5", "listed twice"),
])
def test_bad_specs(spec, needle) -> None:
    with pytest.raises(DataError) as e:
        parse_data_spec(spec)
    assert needle in str(e.value)


def test_spec_forms() -> None:
    (a, b, c, d) = parse_data_spec("hh:0.5,shp:Anthropic/other:0.3,local:./x.csv[prompt=q,chosen=g,rejected=b]:0.2,"
                                   "./y.jsonl")
    assert (a.name, a.location, a.weight) == ("hh", "", 0.5)
    assert (b.name, b.location, b.weight) == ("shp", "Anthropic/other", 0.3)
    assert (c.name, c.location, c.weight, c.options) == ("local", "./x.csv", 0.2,
                                                         {"prompt": "q", "chosen": "g", "rejected": "b"})
    assert (d.name, d.location, d.weight) == ("", "./y.jsonl", 1.0)
    yaml_form = parse_data_spec([{"source": "hh", "weight": 0.5},
                                 {"source": "local", "path": "./x.csv", "weight": 0.2,
                                  "columns": {"prompt": "q", "chosen": "g", "rejected": "b"}}])
    assert yaml_form == [a, c]
