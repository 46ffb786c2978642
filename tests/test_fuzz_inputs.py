"""Property-based fuzz (hypothesis) of what users type and feed: config overrides and data rows never
give a traceback. Any input either works or fails with ONE ``error:`` line and a non-zero exit.

* Overrides: 1-4 ``key=value`` items, keys drawn from every config key (plus algo.* fields and
  made-up keys), values from numbers (nan, inf, huge, negative), booleans, YAML-ish and random text.
  They go through ``rlhf run`` in-process up to the point where training would start (the stages are
  replaced by a stub), so config building, cross-section rules and preflight are all fuzzed.
* Data rows: a JSONL file of 1-6 random rows (canonical and made-up columns; text, numbers, null,
  lists, nested objects) through ``rlhf data inspect``, which reads, converts, trains the in-process
  tokenizer on and tokenizes the rows exactly as ``rlhf run`` does.

Bounded for the shared 2-core machine: 60 + 40 examples, no deadline (well under a minute).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402


def bounded(n: int):
    """``n`` examples, no deadline, a fixed sequence (no flaky reruns; no example database)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("in_process_world")  # conftest.py


def assert_clean(result) -> None:
    """Success, or a user error: one ``error:`` line, non-zero exit, nothing escaping, no traceback."""
    out = result.output
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        assert result.exit_code == 2, out
        assert len([ln for ln in out.splitlines() if ln.startswith("error:")]) >= 1, out


def _keys() -> list[str]:
    from rlhf_cli.config import all_keys

    return sorted(all_keys()) + ["algo.kl_coef", "algo.clip_eps", "algo.top_p", "algo.samples_per_prompt",
                                 "algo.beta", "sft.nope", "nosection.key", "sft", ""]


NUMBERS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2, 3, 7, 1e-12, 1e308, 1e999]))
VALUES = st.one_of(NUMBERS.map(str), st.sampled_from(["true", "false", "none", "null", "~", "", "[1, 2]", "{a: 1}",
                                                      "nan", "-inf", ".inf", "1e999", "0x10", "1_000", "demo",
                                                      "ppo", "dpo", "hf", "fast", "cosine", "best", "model",
                                                      "'quoted'", "a: b", "- x"]),
                   st.text(max_size=12))


@st.composite
def overrides(draw) -> list[str]:
    keys = _keys()
    n = draw(st.integers(1, 4))
    return [f"{draw(st.sampled_from(keys))}={draw(VALUES)}" for _ in range(n)]


@bounded(60)
@given(items=overrides())
def test_fuzzed_overrides_never_give_a_traceback(items: list[str], monkeypatch) -> None:
    from rlhf_cli import app as app_module

    def stub(*args, **kwargs):
        return None

    monkeypatch.setattr(app_module, "_run_stages", stub)  # stop where training would start
    for name in ("_relaunch", "relaunch"):  # deepspeed.nproc > 1 would start torchrun
        monkeypatch.setattr(app_module, name, stub, raising=False)
    with tempfile.TemporaryDirectory() as d:
        result = CliRunner().invoke(app_module.app, ["run", "--out", str(Path(d) / "o"), "--", *items])
    assert_clean(result)


TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
CELL = st.recursive(st.one_of(TEXT, st.integers(-5, 5), st.none(), st.booleans(), st.floats(allow_nan=False)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.sampled_from(["role", "content", "x"]), inner,
                                                            max_size=3)),
                    max_leaves=6)
ROW = st.dictionaries(st.sampled_from(["prompt", "response", "chosen", "rejected", "messages", "question", "x"]),
                      CELL, max_size=5)


@bounded(40)
@given(rows=st.lists(ROW, min_size=1, max_size=6))
def test_fuzzed_data_rows_never_give_a_traceback(rows: list[dict]) -> None:
    from rlhf_cli.app import app

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "rows.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        result = CliRunner().invoke(app, ["data", "inspect", f"local:{f}", "--examples", "1",
                                          "data.eval_fraction=0.0", f"data.cache_dir={d}/cache"])
    assert_clean(result)
