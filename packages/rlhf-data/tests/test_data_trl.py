"""TRL's standard dataset types (plain and conversational) as local files, save_to_disk directories
and hub datasets: the records and the per-stage counts they give, and the errors when they give none.

Rows follow TRL's documentation of its dataset formats; every expected count and record below is
worked out by hand from the rows.
"""

from __future__ import annotations

import json

import pytest
from rlhf_data import (
    ChatRecord,
    DataError,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    build_stage_data,
    parse_data_spec,
)
from rlhf_data.testing import write_rows

U, A = "user", "assistant"


def user(text: str) -> list[dict]:
    return [{"role": U, "content": text}]


def bot(text: str) -> list[dict]:
    return [{"role": A, "content": text}]


QA = [("What color is the sky?", "It is blue.", "It is green."),
      ("What color is grass?", "It is green.", "It is purple."),
      ("What color is snow?", "It is white.", "It is black.")]

# format -> (rows, format detected for a bare file, (sft, rm, rl) samples with all of the file in that stage)
FORMATS = {
    "language modelling, plain": (
        [{"text": "The sky is blue."}, {"text": "Grass is green."}, {"text": "Snow is white."}],
        "trl", (3, 0, 0)),
    "language modelling, conversational": (
        [{"messages": user(q) + bot(c)} for q, c, _ in QA],
        "messages", (3, 0, 3)),
    "prompt-only, plain": (
        [{"prompt": "The sky is"}, {"prompt": "Grass is"}, {"prompt": "Snow is"}],
        "local", (0, 0, 3)),
    "prompt-only, conversational": (
        [{"prompt": user(q)} for q, _, _ in QA],
        "trl", (0, 0, 3)),
    "prompt-completion, plain": (
        [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "Grass is", "completion": " green."},
         {"prompt": "Snow is", "completion": " white."}, {"prompt": "Coal is", "completion": " black."}],
        "trl", (4, 0, 4)),
    "prompt-completion, conversational": (
        [{"prompt": user(q), "completion": bot(c)} for q, c, _ in QA],
        "trl", (3, 0, 3)),
    "preference, explicit prompt, plain": (
        [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
         {"prompt": "Grass is", "chosen": " green.", "rejected": " purple."},
         {"prompt": "Snow is", "chosen": " white.", "rejected": " white."}],  # chosen == rejected: dropped
        "local", (2, 2, 2)),
    "preference, explicit prompt, conversational": (
        [{"prompt": user(q), "chosen": bot(c), "rejected": bot(r)} for q, c, r in QA],
        "trl", (3, 3, 3)),
    "preference, implicit prompt, plain": (
        [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
         {"chosen": "Grass is green.", "rejected": "Grass is purple."},
         {"chosen": "Blue.", "rejected": "Green."}],  # no shared leading words: dropped
        "trl", (2, 2, 2)),
    "preference, implicit prompt, conversational": (
        [{"chosen": user(q) + bot(c), "rejected": user(q) + bot(r)} for q, c, r in QA],
        "ultrafeedback", (3, 3, 3)),
    "unpaired preference, plain": (
        [{"prompt": "The sky is", "completion": " blue.", "label": True},
         {"prompt": "The sky is", "completion": " green.", "label": False},
         {"prompt": "Grass is", "completion": " green.", "label": True},
         {"prompt": "Grass is", "completion": " purple.", "label": False},
         {"prompt": "Snow is", "completion": " white.", "label": True}],
        "trl", (3, 0, 5)),
    "unpaired preference, conversational": (
        [{"prompt": user(q), "completion": bot(c), "label": True} for q, c, _ in QA] +
        [{"prompt": user(q), "completion": bot(r), "label": False} for q, _, r in QA[:2]],
        "trl", (3, 0, 5)),
}
DROPPED = {"preference, explicit prompt, plain": {"chosen == rejected": 1},
           "preference, implicit prompt, plain": {"implicit prompt: chosen and rejected share no leading words": 1}}


def stage_counts(spec: str) -> tuple[tuple[int, int, int], list]:
    """(sft, rm, rl) samples with the whole file in one stage at a time (no eval holdout), and the reports."""
    counts, reports = [], []
    for split, stage in (("1,0,0", "sft"), ("0,1,0", "rm"), ("0,0,1", "rl")):
        data = build_stage_data(spec, split=split, eval_fraction=0.0, seed=0)
        counts.append(len(getattr(data, stage)))
        reports.append(data.reports[0])
    return tuple(counts), reports


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_trl_format_stage_counts(tmp_path, fmt, ext) -> None:
    rows, detected, expected = FORMATS[fmt]
    f = write_rows(tmp_path / f"data{ext}", rows)
    for spec, name in ((str(f), detected), (f"trl:{f}", "trl")):  # detected, and named explicitly
        counts, reports = stage_counts(spec)
        assert counts == expected, (spec, counts)
        assert reports[0].format == name
        assert reports[0].rows == len(rows) and dict(reports[0].dropped) == DROPPED.get(fmt, {})
        # what a stage could not use is counted, by reason, never silently lost
        for stage, n, rep in zip(("sft", "rm", "rl"), counts, reports, strict=True):
            assert n + sum(rep.unusable[stage].values()) == rep.parts[stage], (stage, rep.unusable)


def records(spec: str) -> list:
    from rlhf_data.stages import load_records

    (sp,) = parse_data_spec(spec)
    return load_records(sp)[0]


def test_trl_records_plain(tmp_path) -> None:
    def load(rows):
        return records(f"trl:{write_rows(tmp_path / 'x.jsonl', rows)}")

    assert load(FORMATS["prompt-completion, plain"][0])[:2] == [SFTRecord("The sky is", "blue."),
                                                                  SFTRecord("Grass is", "green.")]
    assert load(FORMATS["preference, implicit prompt, plain"][0]) == [
        PreferenceRecord("The sky is", "blue.", "green."), PreferenceRecord("Grass is", "green.", "purple.")]
    # the shared text ends inside a word ("is" / "isn't"): the prompt stops at the word before it
    assert load([{"chosen": "The sky is blue.", "rejected": "The sky isn't."}]) == [
        PreferenceRecord("The sky", "is blue.", "isn't.")]
    assert load(FORMATS["language modelling, plain"][0])[0] == SFTRecord("", "The sky is blue.")
    unpaired = load(FORMATS["unpaired preference, plain"][0])
    assert [r.meta["label"] for r in unpaired] == [True, False, True, False, True]


def test_trl_records_conversational(tmp_path) -> None:
    def load(rows):
        return records(f"trl:{write_rows(tmp_path / 'x.jsonl', rows)}")

    q, c, r = QA[0]
    assert load([{"prompt": user(q), "completion": bot(c)}]) == [SFTRecord(q, c)]
    assert load([{"prompt": user(q), "chosen": bot(c), "rejected": bot(r)}]) == [PreferenceRecord(q, c, r)]
    assert load([{"prompt": user(q)}]) == [PromptRecord(q)]
    history = [{"role": "system", "content": "Be brief."}] + user("Hi") + bot("Hello.") + user(q)
    assert load([{"prompt": history, "completion": bot(c)}]) == [SFTRecord(tuple(history), c)]
    # implicit prompt: the shared leading messages (a multi-turn history) are the prompt
    assert load([{"chosen": history + bot(c), "rejected": history + bot(r)}]) == [
        PreferenceRecord(tuple(history), c, r)]
    assert load([{"messages": user(q) + bot(c)}]) == [ChatRecord(tuple(user(q) + bot(c)))]


def test_prompt_completion_file_trains_sft_on_exactly_the_completions(tmp_path) -> None:
    """The reported bug: prompt/completion rows became RL prompts and SFT got nothing. Now SFT trains
    on the completions: the loss mask (labels != -100) covers the completion tokens and EOS only."""
    from rlhf_data import TokenizeConfig, collate_sft, tokenize_records, train_demo_tokenizer

    rows = FORMATS["prompt-completion, plain"][0]
    f = write_rows(tmp_path / "pc.jsonl", rows)
    data = build_stage_data(str(f), split="1,0,0", eval_fraction=0.0, seed=0)
    assert len(data.sft) == 4 and data.rl == [] and data.reports[0].format == "trl"
    tok = train_demo_tokenizer(data.corpus + ["The sky is blue."], vocab_size=300)
    examples = tokenize_records(tok, data.sft, "sft", TokenizeConfig(max_prompt_len=64, max_response_len=16)).examples
    batch = collate_sft(examples, tok.pad_token_id, mask_prompt=True)
    expected = {"The sky is": " blue.", "Grass is": " green.", "Snow is": " white.", "Coal is": " black."}
    for i, rec in enumerate(data.sft):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        kept = (labels != -100).nonzero().flatten().tolist()
        # the prompt renders as "Human: The sky is\n\nAssistant:"; the completion follows with one space
        prompt_ids = tok(f"Human: {rec.prompt}\n\nAssistant:")["input_ids"]
        completion_ids = tok(expected[rec.prompt])["input_ids"] + [tok.eos_token_id]
        assert kept == list(range(len(prompt_ids), len(prompt_ids) + len(completion_ids)))
        assert ids[kept].tolist() == completion_ids
        assert tok.decode(ids[kept]) == expected[rec.prompt] + "<eos>"


def test_language_modelling_text_trains_on_every_token(tmp_path) -> None:
    from rlhf_data import TokenizeConfig, collate_sft, tokenize_records, train_demo_tokenizer

    f = write_rows(tmp_path / "lm.jsonl", FORMATS["language modelling, plain"][0])
    data = build_stage_data(str(f), split="1,0,0", eval_fraction=0.0, seed=0)
    tok = train_demo_tokenizer(data.corpus, vocab_size=300)
    ex = tokenize_records(tok, data.sft, "sft", TokenizeConfig(max_prompt_len=8, max_response_len=32)).examples
    batch = collate_sft(ex, tok.pad_token_id)
    text = data.sft[0].response
    ids = tok(text)["input_ids"] + [tok.eos_token_id]  # raw text: no "Human:", no leading space
    assert ex[0] == {"input_ids": ids, "prompt_len": 0}
    assert (batch["labels"][0, : len(ids)] != -100).all()


def test_rows_of_one_prompt_stay_in_one_part_and_text_rows_do_not(tmp_path) -> None:
    f = write_rows(tmp_path / "lm.jsonl", [{"text": f"Line {i}."} for i in range(30)])
    data = build_stage_data(str(f), split="1,1,1", eval_fraction=0.0, seed=0)
    # each text is its own group, so a 1,1,1 split gives SFT a third of them (and RM/RL none, counted)
    rep = data.reports[0]
    assert rep.parts == {"sft": 10, "rm": 10, "rl": 10, "eval": 0} and len(data.sft) == 10
    assert rep.unusable["rl"] == {"language-modelling text (no prompt)": 10}
    assert rep.unusable["rm"] == {"language-modelling text (no prompt): not a chosen/rejected pair": 10}


# --------------------------------------------------------------------------------------------
# nothing usable for a stage, and malformed TRL rows
# --------------------------------------------------------------------------------------------
def test_a_stage_with_no_usable_samples_names_the_source_and_the_fields(tmp_path) -> None:
    f = write_rows(tmp_path / "prompts.jsonl", [{"prompt": user(q)} for q, _, _ in QA])
    data = build_stage_data(str(f), split="1,1,1", eval_fraction=0.0, seed=0)
    assert len(data.rl) == 1 and data.require("rl") == data.rl
    with pytest.raises(DataError) as e:
        data.require("sft")
    msg = str(e.value)
    assert "no usable sft samples" in msg and "source 'prompts.jsonl' (format 'trl'" in msg and "columns 'prompt'" in msg
    assert "prompt-only record (no response): 1" in msg and "'completion'" in msg
    with pytest.raises(DataError, match="rm stage needs a pair: 'chosen' and 'rejected'"):
        data.require("rm")
    report = data.report_dict()["sources"][0]
    assert report["columns"] == ["prompt"] and report["unusable"]["sft"] == {"prompt-only record (no response)": 1}


@pytest.mark.parametrize(("row", "needles"), [
    ({"prompt": user("q") + bot("a"), "completion": bot("b")}, ["'prompt'", "must end with a non-empty user message"]),
    ({"prompt": user("q"), "completion": bot("a") + bot("b")}, ["'completion'", "expected one assistant message",
                                                                  "allowed"]),
    ({"prompt": "q", "completion": "a", "label": "maybe"}, ["'label'", "'maybe'", "allowed: true, false"]),
    ({"prompt": user("q"), "chosen": user("a"), "rejected": bot("b")}, ["'chosen'", "roles ['user']"]),
])
def test_malformed_trl_rows_name_row_field_and_allowed(tmp_path, row, needles) -> None:
    f = write_rows(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as e:
        records(str(f))
    msg = str(e.value)
    assert str(f) in msg and "row 1" in msg and "format 'trl'" in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_trl_columns_matching_no_type(tmp_path) -> None:
    f = write_rows(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        records(f"trl:{f}")
    msg = str(e.value)
    assert "'question', 'answer'" in msg and "prompt-completion: prompt, completion" in msg


def test_csv_labels_are_read_as_booleans(tmp_path) -> None:
    f = write_rows(tmp_path / "u.csv", [{"prompt": "q", "completion": "a", "label": "True"},
                                        {"prompt": "q", "completion": "b", "label": "false"}])
    assert [r.meta["label"] for r in records(f"trl:{f}")] == [True, False]


# --------------------------------------------------------------------------------------------
# where the data lives: arrow files, save_to_disk directories, hub ids with their options
# --------------------------------------------------------------------------------------------
PC_ROWS = [{"prompt": user(q), "completion": bot(c)} for q, c, _ in QA]


def test_arrow_file(tmp_path) -> None:
    import datasets

    d = tmp_path / "saved"
    datasets.Dataset.from_list(PC_ROWS).save_to_disk(str(d))
    (arrow,) = d.glob("*.arrow")
    assert records(str(arrow)) == [SFTRecord(q, c) for q, c, _ in QA]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path) -> None:
    import datasets

    one = tmp_path / "one"
    datasets.Dataset.from_list(PC_ROWS).save_to_disk(str(one))
    data = build_stage_data(str(one), split="1,0,0", eval_fraction=0.0)
    assert len(data.sft) == 3 and data.reports[0].format == "trl" and data.reports[0].where == [str(one)]

    dd = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PC_ROWS[:2]),
                          "test": datasets.Dataset.from_list(PC_ROWS[2:])}).save_to_disk(str(dd))
    from rlhf_data.stages import load_records

    train, evals, report = load_records(parse_data_spec(str(dd))[0])
    assert train == [SFTRecord(q, c) for q, c, _ in QA[:2]] and evals == [SFTRecord(QA[2][0], QA[2][1])]
    assert report.where == [f"{dd}[train]", f"{dd}[test]"]
    # [split=...] picks another split; eval_split=none holds the eval part out of it instead
    train, evals, _ = load_records(parse_data_spec(f"trl:{dd}[split=test,eval_split=none]")[0])
    assert train == [SFTRecord(QA[2][0], QA[2][1])] and evals is None
    with pytest.raises(DataError, match=r"has no split 'valid'.*\[split=NAME\]"):
        load_records(parse_data_spec(f"trl:{dd}[split=valid]")[0])


def test_hub_id_without_an_adapter_prefix_and_load_options(monkeypatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, revision=None, split=None, streaming=False, **kw):
        calls.append({"path": path, "name": name, "revision": revision, "split": split, "streaming": streaming})
        if split != "train":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\'].')
        return iter([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (sp,) = parse_data_spec("me/my-sft-data[subset=en,revision=v1.0,streaming=true,max_rows=4]:0.5")
    assert (sp.name, sp.location, sp.weight) == ("", "me/my-sft-data", 0.5)
    from rlhf_data.stages import load_records

    train, evals, report = load_records(sp)
    assert train == [SFTRecord(f"q{i}", f"a{i}") for i in range(4)] and evals is None
    assert report.format == "trl" and report.where == ["me/my-sft-data[train] (first 4 rows: max_rows)"]
    assert calls == [{"path": "me/my-sft-data", "name": "en", "revision": "v1.0", "split": s, "streaming": True}
                     for s in ("train", "test")]
    calls.clear()
    load_records(parse_data_spec("trl:me/my-sft-data[split=train,eval_split=none]")[0])
    assert calls == [{"path": "me/my-sft-data", "name": None, "revision": None, "split": "train", "streaming": False}]


@pytest.mark.parametrize(("spec", "needles"), [
    ("trl:{f}[revision=v1]", ["revision", "do not apply", "local file"]),
    ("{f}[split=test]", ["split", "do not apply"]),
    ("trl:me/ds[streaming=maybe]", ["streaming='maybe'", "allowed: true, false"]),
    ("trl:me/ds[max_rows=0]", ["max_rows='0'", "whole number >= 1"]),
    ("trl:me/ds[colour=red]", ["unknown option(s) colour", "subset", "revision", "streaming"]),
    ("demo[split=train]", ["unknown option(s) split"]),
])
def test_bad_load_options(tmp_path, spec, needles) -> None:
    from rlhf_data.stages import load_records

    f = write_rows(tmp_path / "x.jsonl", PC_ROWS)
    with pytest.raises(DataError) as e:
        (sp,) = parse_data_spec(spec.format(f=f))
        load_records(sp)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_unknown_name_without_slash_is_still_an_unknown_source() -> None:
    with pytest.raises(DataError, match="unknown data source 'nosuch'.*hub dataset id"):
        parse_data_spec("nosuch")


def test_demo_source_keeps_its_samples() -> None:
    """The demo (and so its numbers) does not move: the same records as before these formats."""
    data = build_stage_data("demo", seed=1234)
    digest = json.dumps([[r.prompt, r.response] for r in data.sft[:5]])
    assert (len(data.sft), len(data.rm), len(data.rl)) == (DEMO_SIZES["sft"], DEMO_SIZES["rm"], DEMO_SIZES["rl"])
    assert digest == DEMO_SFT_HEAD


# measured on main before the TRL formats (a4ccb7a's data code): build_stage_data("demo", seed=1234)
DEMO_SIZES = {"sft": 3040, "rm": 4560, "rl": 2280}
DEMO_SFT_HEAD = ('[["What is 13 + 88?", "101"], ["What is 41 + 48?", "89"], ["What is 24 + 85?", "109"], '
                 '["What is 62 + 29?", "81"], ["What is 85 + 94?", "179"]]')


def test_streaming_a_dataset_directory_with_the_real_loader(tmp_path) -> None:
    """streaming=true and max_rows through datasets.load_dataset itself (a local directory stands in
    for a hub id: the same code path, offline)."""
    from rlhf_data.stages import load_records

    d = tmp_path / "pc-dir"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    write_rows(d / "train.jsonl", rows[:4])
    write_rows(d / "test.jsonl", rows[4:])
    train, evals, report = load_records(parse_data_spec(f"trl:{d}[streaming=true,max_rows=3]")[0])
    assert train == [SFTRecord(f"q{i}", f"a{i}") for i in range(3)]
    assert evals == [SFTRecord("q4", "a4"), SFTRecord("q5", "a5")]
    assert report.where == [f"{d}[train] (first 3 rows: max_rows)", f"{d}[test] (first 3 rows: max_rows)"]
    # a directory with no test split: the eval part is held out of train instead, streaming or not
    (d / "test.jsonl").unlink()
    for opts in ("[streaming=true]", ""):
        train, evals, _ = load_records(parse_data_spec(f"trl:{d}{opts}")[0])
        assert len(train) == 4 and evals is None
