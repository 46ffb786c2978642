"""``rlhf run --nproc N`` re-runs the command under torchrun: the child's arguments must survive
torchrun's own argument parser (which once rejected ``--nproc`` as an ambiguous abbreviation of its
``--nproc-per-node``, even after ``-m rlhf_cli``)."""

from __future__ import annotations

import pytest
from rlhf_cli.launch import child_args as _child_args


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--nproc", "2", "--stage", "ppo"], ["run", "--stage", "ppo", "deepspeed.nproc=2"]),
        (["run", "--nproc=4", "sft.epochs=1"], ["run", "sft.epochs=1", "deepspeed.nproc=4"]),
        # the option wins over an earlier override, so its value goes last (the last override wins)
        (["run", "deepspeed.nproc=3", "--nproc", "2"], ["run", "deepspeed.nproc=3", "deepspeed.nproc=2"]),
        (["run", "deepspeed.nproc=2", "--stage", "sft"], ["run", "deepspeed.nproc=2", "--stage", "sft"]),
    ],
)
def test_child_args_rewrite_nproc_as_an_override(argv: list[str], expected: list[str]) -> None:
    assert _child_args(argv) == expected


def test_torchrun_accepts_the_child_command_line() -> None:
    from torch.distributed.run import get_args_parser

    argv = ["run", "--stage", "ppo", "--out", "o", "--nproc", "2", "--zero-stage", "3", "--seed", "1",
            "-c", "x.yaml", "-s", "ppo", "rl.reward=verifier"]
    prefix = ["--standalone", "--nproc_per_node=2", "-m", "rlhf_cli"]
    parser = get_args_parser()
    with pytest.raises(SystemExit):  # what the relaunch used to pass: torchrun exits with a usage error
        parser.parse_args([*prefix, *argv])
    args = parser.parse_args([*prefix, *_child_args(argv)])
    assert args.training_script == "rlhf_cli"
    assert args.training_script_args == _child_args(argv)
    assert args.nproc_per_node == "2"
