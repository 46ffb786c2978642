"""The run ledger (rlhf_cli.ledger): stage outputs trained from different inputs never mix silently.

* Unit: the re-running rule (stale later stages, found through chains) and the reading rule, on
  stage directories written by hand.
* End to end (slow): sft -> rm; re-running sft alone refuses before training and names rm/; a
  replaced sft makes `--stage ppo` refuse the reward model; `--overwrite` deletes the stale output
  and its summary section; ledger.json and summary.json are written after every stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from rlhf_cli.ledger import LedgerError, check_inputs, remove_stale, stale_outputs, write_ledger

TINY = ["data.num_eval=40", "data.num_valid=20", "model.hidden_size=64", "model.intermediate_size=128",
        "sft.epochs=1", "rm.epochs=1", "data.rm_samples=64", "rl.iterations=1", "rl.rollout_batch_size=16",
        "rl.micro_batch_size=16", "rl.eval_every=1"]


def _stage(out, name: str, cid: str | None, inputs: dict | None = None) -> None:
    d = out / name
    d.mkdir(parents=True)
    card = {"stage": name, "inputs": inputs or {}}
    if cid is not None:
        card["checkpoint_id"] = cid
    (d / "run_card.json").write_text(json.dumps(card))


def test_rerunning_a_stage_finds_every_later_stage_trained_from_it(tmp_path) -> None:
    _stage(tmp_path, "sft", "s1")
    _stage(tmp_path, "rm", "r1", {"sft": "s1"})
    _stage(tmp_path, "ppo", "p1", {"sft": "s1", "rm": "r1"})
    _stage(tmp_path, "grpo", "g1", {"sft": "s1"})
    assert stale_outputs(tmp_path, ["sft"]) == ["grpo", "ppo", "rm"]
    assert stale_outputs(tmp_path, ["rm"]) == ["ppo"]
    assert stale_outputs(tmp_path, ["sft", "rm", "ppo"]) == ["grpo"]
    assert stale_outputs(tmp_path, ["ppo"]) == []
    assert stale_outputs(tmp_path / "missing", ["sft"]) == []


def test_a_chain_counts_rm_trained_from_sft_makes_ppo_stale_even_without_a_direct_input(tmp_path) -> None:
    _stage(tmp_path, "sft", "s1")
    _stage(tmp_path, "rm", "r1", {"sft": "s1"})
    _stage(tmp_path, "ppo", "p1", {"rm": "r1"})  # as if ppo had recorded only the reward model
    assert stale_outputs(tmp_path, ["sft"]) == ["rm", "ppo"]  # rm first, then ppo through it


def test_remove_stale_refuses_without_overwrite_and_deletes_with_it(tmp_path) -> None:
    _stage(tmp_path, "sft", "s1")
    _stage(tmp_path, "rm", "r1", {"sft": "s1"})
    summary = {"sft": {"x": 1}, "rm": {"y": 2}, "wall_seconds": {"sft": 1.0, "rm": 2.0}}
    with pytest.raises(LedgerError, match=r"re-running sft would leave .*/rm/ trained from the sft output.*--overwrite"):
        remove_stale(tmp_path, ["sft"], summary, overwrite=False)
    assert (tmp_path / "rm").is_dir() and "rm" in summary
    assert remove_stale(tmp_path, ["sft"], summary, overwrite=True) == ["rm"]
    assert not (tmp_path / "rm").exists() and (tmp_path / "sft").is_dir()
    assert summary == {"sft": {"x": 1}, "wall_seconds": {"sft": 1.0}}


def test_reading_an_output_trained_from_a_replaced_upstream_is_refused(tmp_path) -> None:
    _stage(tmp_path, "sft", "s2")  # replaced: rm was trained from s1
    _stage(tmp_path, "rm", "r1", {"sft": "s1"})
    with pytest.raises(LedgerError, match=r"/rm was trained from another sft output than the one now in .*/sft "
                                          r"\(checkpoint s1, now s2\)"):
        check_inputs(tmp_path, "rm")
    check_inputs(tmp_path, "sft")  # no inputs: fine


def test_outputs_without_an_id_are_not_checked(tmp_path) -> None:
    _stage(tmp_path, "sft", None)  # written before the ledger existed
    _stage(tmp_path, "rm", None, {})
    check_inputs(tmp_path, "rm")
    assert stale_outputs(tmp_path, ["sft"]) == []


def test_write_ledger_lists_each_stage_with_its_inputs(tmp_path) -> None:
    _stage(tmp_path, "sft", "s1")
    _stage(tmp_path, "rm", "r1", {"sft": "s1"})
    ledger = write_ledger(tmp_path, {"seed": 1})
    assert json.loads((tmp_path / "ledger.json").read_text()) == ledger
    assert ledger["stages"]["rm"]["inputs"] == {"sft": "s1"} and ledger["stages"]["sft"]["checkpoint_id"] == "s1"


@pytest.mark.slow
def test_stages_refuse_to_mix_and_overwrite_deletes_end_to_end(tmp_path, rlhf, explain) -> None:
    out = tmp_path / "run"
    proc = rlhf(["run", "--stage", "sft", "--out", out, *TINY], timeout=600)
    assert proc.returncode == 0, explain(proc)
    assert set(json.loads((out / "summary.json").read_text())) >= {"sft"}
    proc = rlhf(["run", "--stage", "rm", "--out", out, *TINY], timeout=600)
    assert proc.returncode == 0, explain(proc)
    card = lambda s: json.loads((out / s / "run_card.json").read_text())  # noqa: E731
    sft_id = card("sft")["checkpoint_id"]
    assert card("rm")["inputs"] == {"sft": sft_id}
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["stages"]["rm"]["inputs"] == {"sft": sft_id}

    # 1. re-running sft alone would leave rm/ trained from the old SFT model: refused before training
    proc = rlhf(["run", "--stage", "sft", "--out", out, *TINY], timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text, explain(proc)
    assert f"{out / 'rm'}/" in text and "--overwrite" in text, text
    assert card("sft")["checkpoint_id"] == sft_id  # nothing was trained or saved

    # 2. a replaced sft/ (another checkpoint id) makes the reward model unusable for stage 3
    cs = card("sft")
    cs["checkpoint_id"] = "0" * 32
    (out / "sft" / "run_card.json").write_text(json.dumps(cs))
    proc = rlhf(["run", "--stage", "ppo", "--out", out, *TINY, "rl.reward=model"], timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text, explain(proc)
    assert "rm was trained from another sft output" in text, text
    assert not (out / "ppo").exists()

    # 3. --overwrite deletes rm/ and its summary section, then trains sft
    proc = rlhf(["run", "--stage", "sft", "--out", out, "--overwrite", *TINY], timeout=600)
    assert proc.returncode == 0, explain(proc)
    assert not (out / "rm").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert "rm" not in summary and "rm" not in summary["wall_seconds"]
    assert set(json.loads((out / "ledger.json").read_text())["stages"]) == {"sft"}
    assert card("sft")["checkpoint_id"] not in (sft_id, "0" * 32)


def test_clean_orphans_removes_a_dead_savers_temp_dirs_and_puts_back_an_interrupted_swap(tmp_path) -> None:
    from rlhf_cli.ledger import clean_orphans

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is gone
    (tmp_path / f"sft.tmp-{dead.pid}").mkdir()  # killed while writing sft
    (tmp_path / f"rm.old-{dead.pid}").mkdir()  # killed between the two renames: rm/ is missing
    (tmp_path / f"rm.old-{dead.pid}" / "config.json").write_text("{}")
    (tmp_path / f"ppo.tmp-{os.getpid()}").mkdir()  # a live process's: left alone
    done = clean_orphans(tmp_path)
    assert len(done) == 2, done
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["rm", f"ppo.tmp-{os.getpid()}"])
    assert (tmp_path / "rm" / "config.json").is_file()
