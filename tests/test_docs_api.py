"""docs/api.md's complete example runs as written and its own GRPO loop raises the demo's held-out
verifier score, like the built-in stage does.

It needs a demo SFT checkpoint: this test makes one with ``rlhf run --stage sft`` (the default demo
settings, about two minutes on the CI machine) and runs the example in a directory where
``runs/demo/sft`` is that checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.mark.slow
def test_api_example_runs_and_improves_the_demo(tmp_path, rlhf, explain, monkeypatch) -> None:
    proc = rlhf(["run", "--stage", "sft", "--out", tmp_path / "runs" / "demo"], timeout=900)
    assert proc.returncode == 0, explain(proc)
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = io.StringIO()
    from rlhf_hybrid.testing import world_of_one

    # the example's own init_distributed() joins this world of one (an earlier test's, if any)
    with world_of_one(), contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_api_example"})
    text = out.getvalue()
    m = re.search(r"held-out verifier score: ([0-9.]+) -> ([0-9.]+)", text)
    assert m, text
    before, after = float(m.group(1)), float(m.group(2))
    assert after > before + 0.05, text
    assert (tmp_path / "runs" / "demo" / "my-grpo" / "config.json").is_file()
    assert os.path.isfile(tmp_path / "runs" / "demo" / "my-grpo" / "tokenizer.json")
