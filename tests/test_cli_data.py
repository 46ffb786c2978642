"""The CLI on real-format data: ``rlhf run --data <HH jsonl>`` end to end, ``rlhf data inspect``,
``rlhf data sources``, and data errors as one clear line."""

from __future__ import annotations

import json

import pytest

TINY = ["model.hidden_size=64", "model.intermediate_size=128", "sft.epochs=1", "sft.batch_size=16",
        "rm.epochs=1", "rm.batch_size=16", "rl.iterations=2", "rl.rollout_batch_size=16",
        "rl.micro_batch_size=16", "rl.eval_every=1", "data.max_eval=40"]


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    from rlhf_data.testing import addition_hh_rows, write_rows

    rows = addition_hh_rows(400, seed=5)
    rows.append({"chosen": rows[0]["chosen"], "rejected": rows[0]["chosen"]})  # chosen == rejected: dropped
    return write_rows(tmp_path_factory.mktemp("hh") / "hh-train.jsonl", rows)


@pytest.fixture(scope="module")
def hh_run(tmp_path_factory, hh_file, rlhf, explain):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("run") / "out"
    proc = rlhf(["run", "--stage", "all", "--data", hh_file, "--out", out, *TINY], timeout=600,
                env={"RLHF_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, explain(proc)
    return out, cache, proc


def test_run_all_on_a_local_hh_file(hh_run, hh_file) -> None:
    out, _, proc = hh_run
    summary = json.loads((out / "summary.json").read_text())
    assert {"sft", "rm", "ppo"} <= set(summary)
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "config.json").is_file() and (out / stage / "run_card.json").is_file()
    report = json.loads((out / "data_report.json").read_text())
    (src,) = report["sources"]
    assert src["format"] == "hh" and src["rows"] == 401 and src["dropped"] == {"chosen == rejected": 1}
    # default split 2,4,4 after a 10% eval holdout; parts are cut in prompts (a few of the random
    # questions repeat, and rows sharing a prompt stay together), so the sizes are near, not exact
    parts = src["parts"]
    assert parts["eval"] + parts["sft"] + parts["rm"] + parts["rl"] == 400
    assert 36 <= parts["eval"] <= 44 and abs(parts["sft"] - 72) <= 4 and abs(parts["rm"] - 144) <= 6
    # no verifier in this data: PPO is evaluated with the reward model
    assert summary["ppo"]["eval_metric"] == "reward_model_score"
    assert "reward model score, greedy" in proc.stdout + proc.stderr
    assert summary["sft"]["data"]["sft"]["samples"] == parts["sft"]


def test_second_run_reuses_the_tokenization_cache_and_packs(hh_run, hh_file, rlhf, explain, tmp_path) -> None:
    out, cache, _ = hh_run
    assert list(cache.rglob("*.json")), "the first run wrote no cache files"
    # packing happens after tokenization, so the packed run still reuses the cached tokens
    proc = rlhf(["run", "--stage", "sft", "--data", hh_file, "--out", tmp_path / "again", *TINY, "sft.packing=true"],
                timeout=300, env={"RLHF_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, explain(proc)
    assert "sft: packed" in proc.stdout + proc.stderr
    stats = json.loads((tmp_path / "again" / "summary.json").read_text())["sft"]["data"]
    assert stats["sft"]["cache_hit"] and stats["sft held-out"]["cache_hit"]
    first = json.loads((out / "summary.json").read_text())["sft"]["data"]
    assert not first["sft"]["cache_hit"]


def test_verifier_reward_needs_data_with_a_verifier(hh_file, rlhf, tmp_path) -> None:
    proc = rlhf(["run", "--stage", "ppo", "--data", hh_file, "--out", tmp_path, "rl.reward=verifier"], timeout=120)
    assert proc.returncode == 2
    assert "rl.reward: 'verifier' needs data with a ground-truth verifier" in proc.stderr


def test_data_inspect(hh_file, rlhf, explain) -> None:
    proc = rlhf(["data", "inspect", f"hh:{hh_file}", "data.split=1,1,1", "data.max_prompt_len=20",
                 "--examples", "2"], timeout=120)
    assert proc.returncode == 0, explain(proc)
    text = proc.stdout
    assert "hh:hh-train.jsonl" in text and "chosen == rejected: 1" in text
    for s in ("sft", "rm", "rl", "sft_eval", "rl_valid"):
        assert f" {s} " in text
    assert "▁" in text or "█" in text  # length histograms
    assert "Human: What is" in text and "[chosen]" in text  # rendered examples
    # prompt limit 20 tokens: the multi-turn prompts (every 5th row) exceed it and are counted as truncated
    assert "truncated p/r" in text


def test_data_inspect_errors_are_one_line(rlhf, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    cases = [
        (["data", "inspect", "nosuch"], ["data.sources", "'nosuch'", "available", "hh", "shp"]),
        (["data", "inspect", f"synthetic-instruct-gptj-pairwise:{bad}"], [str(bad), "missing column", "'rejected'"]),
        (["data", "inspect", "demo", "data.split=2,x,4"], ["data.split", "'x'"]),
        (["data", "inspect", "hh:-1"], ["weight -1", "positive"]),
    ]
    for args, needles in cases:
        proc = rlhf(args, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        err = proc.stderr.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
        for n in needles:
            assert n in err, (n, err)


def test_data_sources_lists_builtins(rlhf) -> None:
    proc = rlhf(["data", "sources"], timeout=60)
    assert proc.returncode == 0
    for name in ("hh", "rm-static", "webgpt", "shp", "ultrafeedback", "sharegpt", "local", "demo"):
        assert f"{name}\t" in proc.stdout
