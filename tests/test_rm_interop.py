"""Issue 14 parts 4 and 5 through the CLI: reward models interoperable with transformers, model.* settings.

- The rm stage's output loads with ``AutoModelForSequenceClassification`` (its trained head) and scores
  like this project's loader.
- A sequence-classification reward model built by transformers (and one in the older causal LM +
  value_head.safetensors format) is PPO's reward via ``--reward-model``: the rewards PPO sees equal
  transformers' scores of the same sequences.
- model.dtype / model.attn_implementation reach the engines (the demo model built from a config too);
  model.trust_remote_code / model.revision reach from_pretrained; bad values are rejected by name.

Training runs are CLI subprocesses on a scaled-down demo; where a test must see inside a run (the rewards
PPO computes, the engines' modules), the subprocess is a small driver that records them with a wrapper
and then runs the CLI's ``main``. Bad values run in-process (Typer's CliRunner) and fail before training.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from typer.testing import CliRunner

TINY = ["data.num_eval=16", "data.num_valid=8", "data.max_eval=16", "data.rm_samples=64", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_heads=4", "sft.epochs=1", "sft.batch_size=32", "rm.epochs=1",
        "rm.batch_size=16", "rl.iterations=1", "rl.rollout_batch_size=8", "rl.micro_batch_size=8",
        "rl.max_new_tokens=4", "rl.eval_every=1"]


def invoke(args: list) -> object:
    from rlhf_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def driven(tmp: Path, cli_tools, recorder: str, args: list) -> tuple[subprocess.CompletedProcess, object]:
    """``rlhf ARGS`` in a subprocess whose ``recorder`` code (defining ``install(record)``) wraps what the test
    looks at; returns the process and what ``record`` got (saved with torch.save)."""
    cli_env, _ = cli_tools
    script = tmp / "driver.py"
    script.write_text(textwrap.dedent(recorder) + textwrap.dedent(f"""
        import sys
        import torch
        records = []
        install(records.append)
        sys.argv = ["rlhf", *{[str(a) for a in args]!r}]
        from rlhf_cli.app import main
        try:
            main()
        finally:
            torch.save(records, {str(tmp / "records.pt")!r})
        """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cli_env(), timeout=900)
    records = torch.load(tmp / "records.pt") if (tmp / "records.pt").exists() else None
    return proc, records


def the_error(result) -> str:
    """The one ``error:`` line of a failed command (no traceback)."""
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, rlhf, explain) -> Path:
    """<out>/sft and <out>/rm of a scaled-down demo run."""
    out = tmp_path_factory.mktemp("run") / "out"
    for stage in ("sft", "rm"):
        proc = rlhf(["run", "--stage", stage, "--out", out, *TINY])
        assert proc.returncode == 0, explain(proc)
    return out


def texts_batch(tokenizer, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) ids and mask of demo-style texts of different lengths."""
    texts = [f"Human: what is {a} + {b}?\n\nAssistant: {a + b}" for a, b in [(1, 2), (13, 29), (7, 400), (55, 5),
                                                                             (123, 456), (9, 9)][:n]]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # some rows are padded
    return enc["input_ids"], enc["attention_mask"]


def test_rm_stage_output_loads_in_transformers_with_the_same_scores(run_dir: Path) -> None:
    from rlhf_hybrid import EngineConfig, HybridEngine, ValueModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = run_dir / "rm"
    assert not (rm / "value_head.safetensors").exists()
    hf = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    assert hf.config.architectures == ["LlamaForSequenceClassification"] and hf.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(rm)
    tok.padding_side = "right"
    assert hf.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert torch.count_nonzero(hf.score.weight) > 0  # trained, not the fresh all-zero head
    ids, mask = texts_batch(tok)
    ours = HybridEngine(ValueModel.from_pretrained(str(rm)), EngineConfig(), trainable=False)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits[:, 0]  # transformers: the last non-pad token
        got = ours.score(ids, mask)
    assert want.std() > 0  # the texts get different scores
    assert_close(got, want, atol=1e-5, rtol=1e-5)  # fp32, the same ops in the same order


def _foreign_rm(tmp: Path, run_dir: Path, fmt: str):
    """A tiny random reward model for the SFT tokenizer, saved by transformers; returns (dir, reference scorer
    of one unpadded sequence -> float)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(run_dir / "sft")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, num_labels=1)
    torch.manual_seed(21)
    d = tmp / fmt
    if fmt == "sequence_classification":
        model = LlamaForSequenceClassification(config).eval()
        model.save_pretrained(d)
        model.config.pad_token_id = None  # the reference scores unpadded rows: their last token, whatever it is

        def score(ids):
            return model(ids[None]).logits[0, 0].item()
    else:  # the older format: causal LM + value_head.safetensors
        from safetensors.torch import save_file
        from transformers import AutoModel

        LlamaForCausalLM(config).save_pretrained(d)
        w = torch.randn(1, 32)
        save_file({"v_head.weight": w}, str(d / "value_head.safetensors"))
        backbone = AutoModel.from_pretrained(d).eval()

        def score(ids):
            return (backbone(ids[None]).last_hidden_state[0, -1] @ w[0]).item()
    return d, score


REWARD_RECORDER = """
    def install(record):
        from rlhf_algos import ModelReward
        call = ModelReward.__call__

        def recording(self, sequences, attention_mask, prompt_len, meta):
            r = call(self, sequences, attention_mask, prompt_len, meta)
            record((sequences.cpu(), attention_mask.cpu(), r.cpu()))
            return r

        ModelReward.__call__ = recording
"""


@pytest.mark.parametrize("fmt", ["sequence_classification", "value_head"])
def test_foreign_reward_model_is_ppos_reward(run_dir: Path, tmp_path: Path, fmt: str, cli_tools, explain) -> None:
    from rlhf_cli.config import load_config
    from rlhf_cli.pipeline import stages_for

    rm_dir, reference = _foreign_rm(tmp_path, run_dir, fmt)
    assert stages_for(load_config(None, [f"model.reward_model={rm_dir}"]), "all") == ["sft", "ppo"]  # no rm stage
    out = tmp_path / "out"
    shutil.copytree(run_dir / "sft", out / "sft")  # stage 3 reads <out>/sft; no <out>/rm: --reward-model is the RM
    proc, seen = driven(tmp_path, cli_tools, REWARD_RECORDER,
                        ["run", "--stage", "ppo", "--out", out, "--reward-model", rm_dir, *TINY])
    assert proc.returncode == 0, explain(proc)
    assert "scoring with the trained reward model" in proc.stdout + proc.stderr
    assert not (out / "rm").exists()
    assert seen and sum(len(r) for *_, r in seen) >= 8
    with torch.no_grad():
        for seqs, mask, rewards in seen:
            want = torch.tensor([reference(s[m.bool()]) for s, m in zip(seqs, mask)])
            assert_close(rewards.float(), want, atol=1e-5, rtol=1e-5)
