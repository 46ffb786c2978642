"""The CLI on TRL-format data: SFT trains on a prompt/completion file's completions, `rlhf data
inspect` and data_report.json count what a stage cannot use, and a stage with no usable samples
stops the run before anything trains, naming the source and the fields it looked for."""

from __future__ import annotations

import json

import pytest

TINY = ["model.hidden_size=64", "model.intermediate_size=128", "sft.epochs=1", "sft.batch_size=8",
        "data.max_eval=10"]


@pytest.fixture(scope="module")
def pc_file(tmp_path_factory):
    from rlhf_data.testing import write_rows

    # 60 TRL prompt/completion rows (conversational), 60 distinct prompts
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}],
             "completion": [{"role": "assistant", "content": str(a + 1)}]} for a in range(10, 70)]
    return write_rows(tmp_path_factory.mktemp("trl") / "pc.parquet", rows)


def test_sft_stage_trains_on_a_prompt_completion_file(pc_file, rlhf, explain, tmp_path) -> None:
    out = tmp_path / "out"
    proc = rlhf(["run", "--stage", "sft", "--data", pc_file, "--out", out, "data.split=1,0,0", *TINY], timeout=300)
    assert proc.returncode == 0, explain(proc)
    report = json.loads((out / "data_report.json").read_text())
    (src,) = report["sources"]
    # 10% of the 60 prompts held out (6), the other 54 all in the SFT part (split 1,0,0)
    assert src["format"] == "trl" and src["rows"] == 60 and src["columns"] == ["prompt", "completion"]
    assert src["parts"] == {"sft": 54, "rm": 0, "rl": 0, "eval": 6} and src["used"]["sft"] == 54
    # the held-out part cannot give reward-model pairs: counted, not lost silently
    assert src["unusable"]["rm_eval"] == {"prompt-response record: not a chosen/rejected pair": 6}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sft"]["data"]["sft"]["samples"] == 54
    assert summary["sft"]["eval_loss_after"] < summary["sft"]["eval_loss_before"]


def test_data_inspect_counts_what_a_stage_cannot_use(pc_file, rlhf, explain) -> None:
    proc = rlhf(["data", "inspect", str(pc_file), "data.split=1,1,1", "data.eval_fraction=0", "--examples", "1"],
                timeout=120)
    assert proc.returncode == 0, explain(proc)
    text = proc.stdout
    assert "pc.parquet" in text and " trl " in text
    # 60 prompts cut 1,1,1: 20 per part; the RM part's 20 are SFT records, not pairs
    assert "pc.parquet: rm: 20 records not usable (prompt-response record: not a chosen/rejected pair: 20)" in text


def test_a_stage_with_no_usable_samples_stops_the_run_first(tmp_path, rlhf) -> None:
    from rlhf_data.testing import write_rows

    f = write_rows(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(30)])
    proc = rlhf(["run", "--stage", "all", "--data", f, "--out", tmp_path / "out", *TINY], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]  # after the per-source data lines: one error line
    assert err.startswith("error:"), proc.stderr
    for needle in ("stage 'sft'", "no usable sft samples", "source 'prompts.jsonl' (format 'trl', columns 'prompt')",
                   "prompt-only record (no response)", "'completion' (with 'prompt')"):
        assert needle in err, (needle, err)
    assert not (tmp_path / "out" / "sft").exists()  # nothing trained
