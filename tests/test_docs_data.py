"""docs/data.md documents every built-in format with its example row, and every example is real:
its adapter converts it to the record the page describes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rlhf_data import ChatRecord, PreferenceRecord, SFTRecord, available_sources

DOC = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
BUILTIN = {name: cls for name, cls in available_sources().items() if cls.__module__.startswith("rlhf_data.")}
OPTIONS = {"local": {"prompt": "question", "chosen": "good", "rejected": "bad"}}
EXPECTED_KIND = {"sharegpt": ChatRecord, "messages": ChatRecord}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_format_is_documented_with_its_example(name) -> None:
    cls = BUILTIN[name]
    assert f"### `{name}`" in DOC, f"docs/data.md has no section for {name}"
    assert f"    {cls.example}\n" in DOC, f"docs/data.md does not show {name}'s example row verbatim"
    if cls.hub_id:
        assert f"`{cls.hub_id}`" in DOC


@pytest.mark.parametrize("name", sorted(set(BUILTIN) - {"demo", "tool-demo"}))
def test_example_row_converts(name) -> None:
    adapter = BUILTIN[name](OPTIONS.get(name))
    record = adapter.convert(json.loads(adapter.example))
    assert isinstance(record, EXPECTED_KIND.get(name, PreferenceRecord))
    if isinstance(record, PreferenceRecord):
        assert record.chosen and record.rejected and record.chosen != record.rejected


def test_demo_example_is_a_demo_record() -> None:
    from rlhf_data import AdditionTask

    row = json.loads(BUILTIN["demo"].example)
    rec = SFTRecord(row["prompt"], row["response"])
    assert AdditionTask.verify(rec.response, {"a": 47, "b": 38}) == 1.0


def test_tool_demo_example_is_a_tool_demo_record() -> None:
    from rlhf_data import build_stage_data
    from rlhf_data.tool_demo import verify_answer

    row = json.loads(BUILTIN["tool-demo"].example)
    assert verify_answer(row["response"], {"a": 12345, "b": 6789}) == 1.0
    assert [r for r, _ in row["turns"]] == ["model", "tool", "model"] and row["turns"][-1][1] == row["response"]
    rec = build_stage_data("tool-demo[num_sft=5,num_rl=2,num_sft_eval=1]", seed=3).sft[0]  # the same layout
    assert [r for r, _ in rec.meta["turns"]][0] == "model" and rec.meta["turns"][-1][1] == rec.response


def test_rlhf_data_readme_examples_run() -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "packages" / "rlhf-data" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code, "packages/rlhf-data/README.md", "exec"), {})


def test_load_option_examples_parse() -> None:
    """The specs in docs/data.md's load-options examples are valid: the options reach the adapter."""
    import re

    from rlhf_data import parse_data_spec

    specs = re.findall(r'^rlhf (?:data inspect|run --stage \w+ --data) "([^"]+)"', DOC, flags=re.M)
    assert len(specs) == 2
    for spec in specs:
        (sp,) = parse_data_spec(spec)
        assert sp.name == "" and "/" in sp.location and {"split", "eval_split"} <= set(sp.options)
        available_sources()["trl"](sp.options)  # every option is accepted


def test_trl_types_are_documented() -> None:
    from rlhf_data.trl_formats import TYPES

    section = DOC.split("### `trl`")[1].split("\n### ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    for name, columns in TYPES:
        assert any(line.split("|")[2].strip() == ", ".join(f"`{c}`" for c in columns) for line in rows), name
