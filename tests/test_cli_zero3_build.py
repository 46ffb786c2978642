"""The CLI's demo SFT model (a tiny Llama built from a config, no model.actor_model) under ZeRO-3: built
partitioned from the first byte, with the same start weights as the whole build of a ZeRO-0 run.

A driver script wraps ``HybridEngine.__init__`` in the ``rlhf`` process (or in each torchrun rank): it
records whether the model arrives ZeRO-3 partitioned and the engine's gathered start weights, then
stops the run (exit 7). The reference is the ZeRO-0 run, which builds the model whole with transformers'
``from_config`` (no rlhf_hybrid.zero_init code on its path).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rlhf_hybrid.distributed import free_port

TINY = ["data.num_eval=16", "data.num_valid=8", "data.max_eval=16", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_heads=4", "sft.epochs=1", "sft.batch_size=32"]

DRIVER = """
    import os
    import sys

    import torch

    import rlhf_hybrid.engine as engine_module
    from rlhf_hybrid.zero_init import is_partitioned, local_numel

    init = engine_module.HybridEngine.__init__

    def recording(self, module, cfg, *args, **kwargs):
        built = {{"partitioned": is_partitioned(module), "numel": local_numel(module)}}
        init(self, module, cfg, *args, **kwargs)
        state = self.full_state_dict()
        torch.save(built | {{"state": state, "zero_stage": cfg.zero_stage}},
                   os.path.join({out!r}, f"start{{os.environ.get('RANK', '0')}}.pt"))
        raise SystemExit(7)  # recorded: the run need not go on

    engine_module.HybridEngine.__init__ = recording
    sys.argv = ["rlhf", *sys.argv[1:]]
    from rlhf_cli.app import main

    main()
"""


def _start(tmp: Path, cli_tools, name: str, args: list, nproc: int = 1) -> list[dict]:
    """The recorded start of the SFT engine in ``rlhf run --stage sft ARGS``, one dict per rank."""
    cli_env, _ = cli_tools
    rec = tmp / name
    rec.mkdir()
    script = tmp / f"{name}_driver.py"
    script.write_text(textwrap.dedent(DRIVER.format(out=str(rec))))
    argv = ["run", "--stage", "sft", "--out", str(tmp / f"{name}_out"), *TINY, *args]
    launch = [sys.executable, str(script)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), str(script)]
    proc = subprocess.run([*launch, *argv], capture_output=True, text=True, env=cli_env(), timeout=600)
    starts = sorted(rec.glob("start*.pt"))
    assert len(starts) == nproc, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [torch.load(p) for p in starts]


@pytest.fixture(scope="module")
def whole_start(tmp_path_factory, cli_tools) -> dict:
    (start,) = _start(tmp_path_factory.mktemp("whole"), cli_tools, "zero0", ["--zero-stage", "0"])
    assert not start["partitioned"] and start["zero_stage"] == 0
    return start["state"]


def _assert_same(state: dict, want: dict) -> None:
    assert state.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(state[k], v), k
    assert float(want["model.layers.0.mlp.up_proj.weight"].std()) > 0.01  # drawn weights, not zeros


def test_demo_sft_model_is_built_partitioned_with_the_whole_builds_weights(whole_start, tmp_path, cli_tools) -> None:
    (start,) = _start(tmp_path, cli_tools, "zero3", ["--zero-stage", "3"])
    assert start["partitioned"] and start["zero_stage"] == 3
    _assert_same(start["state"], whole_start)


@pytest.mark.slow
def test_demo_sft_model_two_ranks_zero3(whole_start, tmp_path, cli_tools) -> None:
    """Two torchrun ranks: each builds only its half of every weight; together the whole build's weights."""
    starts = _start(tmp_path, cli_tools, "zero3x2", ["--zero-stage", "3"], nproc=2)
    for start in starts:
        local, total = start["numel"]
        assert start["partitioned"] and local < 0.55 * total, start["numel"]
        _assert_same(start["state"], whole_start)
