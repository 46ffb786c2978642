"""The reporter's metrics sinks (report.to), report.md with its plots, and config.yaml, without a training run.

Each tracker sink is tested through its local/offline mode where its package is installed (wandb offline,
an mlflow file store, trackio's local database) and skipped with the reason where it is absent; the
rows it was given are read back with the tracker's own reader and compared with what was logged.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

import pytest
from rlhf_cli.config import ConfigError, RunConfig, load_config, resolved_settings, to_yaml
from rlhf_cli.config_report import MissingExtraError, ReportSection
from rlhf_cli.report import Reporter
from rlhf_cli.run_report import read_metrics, write_report
from rlhf_cli.sinks import SINKS, make_sinks, scalars

# Three rows of a stage as a stage logs them: a step-0 evaluation row, two training rows (the second with
# a bool, a string, a list and a None that are not metrics).
ROWS = [
    {"stage": "sft", "step": 0, "eval_loss": 5.5},
    {"stage": "sft", "step": 1, "epoch": 0, "loss": 4.25, "lr": 1e-3, "grad_norm": 2.5},
    {"stage": "sft", "step": 2, "epoch": 0, "loss": 3.75, "lr": 5e-4, "grad_norm": 1.5, "ok": True, "note": "x",
     "warnings": [], "agree": None},
]


def _log_stage(tmp_path: Path, sinks: list, stage: str = "sft") -> Path:
    rep = Reporter(enabled=True)
    rep.sinks = sinks
    jsonl = tmp_path / stage / "metrics.jsonl"
    with rep.stage(stage, 2, jsonl) as r:
        for row in ROWS:
            r.update(advance=1 if "loss" in row else 0, log=row)
    return jsonl


def test_report_to_rejects_unknown_sinks_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"report\.to: 'tb' is not allowed; allowed: .*'tensorboard', 'wandb', "
                                          r"'mlflow', 'trackio'"):
        load_config(None, ["report.to=tensorboard,tb"])
    assert load_config(None, ["report.to= wandb , tensorboard,wandb"]).report.sinks() == ("wandb", "tensorboard")
    assert load_config(None, ["report.to=none"]).report.sinks() == ()
    assert set(SINKS) == {"tensorboard", "wandb", "mlflow", "trackio"}


def test_a_missing_sink_package_raises_with_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    section = ReportSection(to="mlflow")
    with pytest.raises(MissingExtraError) as e:
        section.check_installed()
    assert str(e.value) == ("report.to: 'mlflow' needs the mlflow package, which is not installed; install it with: "
                            "pip install 'rlhf-cli[mlflow]'")
    assert isinstance(e.value, ImportError) and isinstance(e.value, ValueError)  # the CLI reports it in one line
    ReportSection(to="").check_installed()  # nothing asked, nothing needed


class RecordingSink:
    def __init__(self, jsonl: Path | None = None):
        self.calls: list = []
        self.jsonl = jsonl

    def start(self, stage):
        self.calls.append(("start", stage))

    def log(self, values, step):
        # the row is already on disk, whole, before any sink sees it (flushed per row)
        lines = self.jsonl.read_text().splitlines() if self.jsonl else []
        self.calls.append(("log", step, values, len(lines)))

    def finish(self):
        self.calls.append(("finish",))


def test_reporter_writes_each_row_at_once_and_sends_the_numbers_to_every_sink(tmp_path):
    a, b = RecordingSink(tmp_path / "sft" / "metrics.jsonl"), RecordingSink()
    jsonl = _log_stage(tmp_path, [a, b])
    expected_values = [{"eval_loss": 5.5}, {"epoch": 0.0, "loss": 4.25, "lr": 1e-3, "grad_norm": 2.5},
                       {"epoch": 0.0, "loss": 3.75, "lr": 5e-4, "grad_norm": 1.5}]
    assert a.calls == [("start", "sft"), *[("log", i, v, i + 1) for i, v in enumerate(expected_values)], ("finish",)]
    assert [c[:3] for c in b.calls[1:-1]] == [("log", i, v) for i, v in enumerate(expected_values)]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == ROWS


def test_sinks_are_finished_when_a_stage_fails(tmp_path):
    sink = RecordingSink()
    rep = Reporter(enabled=True)
    rep.sinks = [sink]
    with pytest.raises(RuntimeError, match="boom"), rep.stage("rm", 3, tmp_path / "rm" / "metrics.jsonl") as r:
        r.log({"stage": "rm", "step": 0, "loss": 1.0})
        raise RuntimeError("boom")
    assert sink.calls[-1] == ("finish",)
    assert json.loads((tmp_path / "rm" / "metrics.jsonl").read_text())["loss"] == 1.0


def test_scalars_keep_numbers_only():
    assert scalars(ROWS[2]) == {"epoch": 0.0, "loss": 3.75, "lr": 5e-4, "grad_norm": 1.5}


def _logged(step_key: str = "step") -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value)]}`` of ROWS: what a sink must hold afterwards."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in ROWS:
        for k, v in scalars(row).items():
            out.setdefault(k, []).append((row[step_key], v))
    return out


def test_tensorboard_sink_event_files_hold_the_rows(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'rlhf-cli[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_stage(tmp_path, make_sinks(("tensorboard",), tmp_path, "rlhf", {}))
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "sft"))
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    expected = {k: [(s, pytest.approx(v, rel=1e-6)) for s, v in pts] for k, pts in _logged().items()}
    assert got == expected


def test_mlflow_sink_local_database_holds_the_rows(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'rlhf-cli[mlflow]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _log_stage(tmp_path, make_sinks(("mlflow",), tmp_path, "rlhf-test", {"sft.lr": 1e-3, "seed": 42}))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rlhf-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == f"{tmp_path.name}-sft" and run.info.status == "FINISHED"
    assert run.data.params == {"sft.lr": "0.001", "seed": "42"}
    for key, pts in _logged().items():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert hist == [(s, pytest.approx(v)) for s, v in pts], key


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log-format chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) in
    32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def test_wandb_sink_offline_run_holds_the_rows(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'rlhf-cli[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_stage(tmp_path, make_sinks(("wandb",), tmp_path, "rlhf-test", {"seed": 42}))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (store_file,) = run_dir.glob("*.wandb")
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
               for rec in _wandb_records(store_file) if rec.WhichOneof("record_type") == "history"]
    got = {k: [(h["_step"], h[k]) for h in history if k in h] for k in _logged()}
    assert got == _logged()


def test_trackio_sink_local_run_holds_the_rows(tmp_path, monkeypatch):
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed (pip install 'rlhf-cli[trackio]')")
    if "trackio" in sys.modules:
        pytest.skip("trackio was imported before this test set TRACKIO_DIR (it reads it at import)")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # never the user's trackio database
    from trackio.sqlite_storage import SQLiteStorage

    _log_stage(tmp_path, make_sinks(("trackio",), tmp_path, "rlhf-test", {"seed": 42}))
    assert SQLiteStorage.get_project_db_path("rlhf-test").is_relative_to(tmp_path)
    logs = SQLiteStorage.get_logs("rlhf-test", f"{tmp_path.name}-sft")
    got = {k: [(r["step"], r[k]) for r in logs if k in r] for k in _logged()}
    assert got == _logged()


def _png_ok(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature; matplotlib then reads it."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    from matplotlib.image import imread

    assert imread(path).shape[:2] == (height, width)
    return width, height


def test_report_of_a_run_in_progress(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'rlhf-cli[plots]')")
    jsonl = _log_stage(tmp_path, [])
    with jsonl.open("a") as f:
        f.write('{"stage": "sft", "step": 3, "loss": 3.')  # the row being written right now
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "metrics.jsonl").write_text(json.dumps({"step": 0, "heldout_accuracy": 0.5}) + "\n")
    (tmp_path / "rm" / "config.json").write_text("{}")  # a finished stage
    assert list(read_metrics(tmp_path)) == ["sft", "rm"]
    report = write_report(tmp_path, say=pytest.fail)
    text = report.read_text()
    assert "No summary.json yet" in text
    assert "## sft\n\nin progress or stopped (no checkpoint); 3 metrics rows, last step 2." in text
    assert "## rm\n\nfinished (checkpoint saved); 1 metrics rows, last step 0." in text
    assert "![sft curves](plots/sft.png)" in text and "![rm curves](plots/rm.png)" in text
    # first, last, min, max of the loss rows 4.25, 3.75
    assert "| loss | 4.25 | 3.75 | 3.75 | 4.25 |" in text
    assert "| grad_norm | 2.5 | 1.5 | 1.5 | 2.5 |" in text
    w, h = _png_ok(tmp_path / "plots" / "sft.png")
    assert w > h > 100  # a grid of panels: loss, eval_loss, lr, grad_norm
    _png_ok(tmp_path / "plots" / "rm.png")


def test_report_without_matplotlib_has_the_tables_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    _log_stage(tmp_path, [])
    said = []
    text = write_report(tmp_path, {"sft": {"eval_loss_before": 5.5, "eval_loss_after": 2.25},
                                   "wall_seconds": {"sft": 3}}, said.append).read_text()
    assert said == ["report: matplotlib is not installed, so no plots (pip install 'rlhf-cli[plots]'); report.md "
                    "has the tables only"]
    assert "| sft | eval loss | 5.5000 | 2.2500 | 3 s |" in text
    assert "![" not in text and not (tmp_path / "plots").exists()


def test_config_yaml_loads_back_to_the_same_resolved_settings(tmp_path):
    cfg = load_config(None, ["algo.name=grpo", "algo.kl_coef=0.07", "rl.iterations=3", "sft.lr=3e-4",
                             "report.to=tensorboard", "data.split=3,3,4", "lora.rank=4"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg, "a header\nof two lines"))
    assert path.read_text().startswith("# a header\n# of two lines\n")
    again = load_config(str(path))
    assert resolved_settings(again) == resolved_settings(cfg)
    assert again.algorithm_config() == cfg.algorithm_config()
    assert again.algorithm_config().kl_coef == 0.07 and again.sft.lr == 3e-4 and again.report.to == "tensorboard"
    # every algo.<field> of GRPO is written, resolved (its default samples_per_prompt included)
    assert resolved_settings(cfg)["algo.samples_per_prompt"] == cfg.algorithm_config().samples_per_prompt
    assert load_config(str(path), ["report.plots=false"]).report.plots is False  # overrides still apply
    assert math.isclose(RunConfig().sft.lr, 1e-3)
