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
            want = torch.tensor([reference(s[m.bool()]) for s, m in zip(seqs, mask, strict=True)])
            assert_close(rewards.float(), want, atol=1e-5, rtol=1e-5)


ENGINE_RECORDER = """
    def install(record):
        import rlhf_hybrid.engine as engine_module
        init = engine_module.HybridEngine.__init__

        def recording(self, module, cfg, *args, **kwargs):
            before = sorted({str(p.dtype) for p in module.parameters()})
            init(self, module, cfg, *args, **kwargs)
            record({"name": self.name, "trainable": self.trainable, "dtype_in": before,
                    "dtype": sorted({str(p.dtype) for p in self.module.parameters()}),
                    "attn": self.module.config._attn_implementation,
                    "checkpointing": sorted({m.gradient_checkpointing for m in self.module.modules()
                                             if type(m).__name__.endswith("DecoderLayer")})})

        engine_module.HybridEngine.__init__ = recording
"""


def test_dtype_attention_and_checkpointing_reach_the_demo_models_engines(tmp_path: Path, cli_tools, explain) -> None:
    out = tmp_path / "out"
    proc, engines = driven(tmp_path, cli_tools, ENGINE_RECORDER,
                           ["run", "--stage", "sft", "--out", out, *TINY, "sft.epochs=1", "deepspeed.dtype=bf16",
                            "model.dtype=bfloat16", "model.attn_implementation=eager",
                            "model.gradient_checkpointing=true"])
    assert proc.returncode == 0, explain(proc)
    assert [e["name"] for e in engines] == ["model"] and engines[0]["trainable"]
    e = engines[0]
    # built from the config in bf16 (not float32 then cast), eager attention, every decoder layer checkpointed
    assert e["dtype_in"] == e["dtype"] == ["torch.bfloat16"], e
    assert e["attn"] == "eager" and e["checkpointing"] == [True], e
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "sft").dtype == torch.bfloat16  # saved as trained


LOAD_RECORDER = """
    def install(record):
        import transformers

        for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
            cls = getattr(transformers, name)
            orig = cls.from_pretrained.__func__

            def recording(klass, path, *args, _name=name, _orig=orig, **kwargs):
                record((_name, str(path), kwargs.get("trust_remote_code"), kwargs.get("revision")))
                if _name == "AutoModelForCausalLM":
                    raise SystemExit(7)  # recorded: the run need not go on
                return _orig(klass, path, *args, **kwargs)

            cls.from_pretrained = classmethod(recording)
"""


def test_trust_remote_code_and_revision_reach_from_pretrained(tmp_path: Path, cli_tools, tiny_demo_model,
                                                              explain) -> None:
    """No hub here: the revision of a local directory is recorded, not resolved (transformers ignores it there)."""
    actor = tiny_demo_model(tmp_path / "actor", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    proc, calls = driven(tmp_path, cli_tools, LOAD_RECORDER,
                         ["run", "--stage", "sft", "--out", tmp_path / "out", "--actor-model", actor, *TINY,
                          "model.trust_remote_code=true", "model.revision=v9"])
    assert proc.returncode == 7, explain(proc)
    assert {c[0] for c in calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}, calls
    assert all(trust is True for _, _, trust, _ in calls), calls
    loads = [c for c in calls if c[0] == "AutoModelForCausalLM"] + [c for c in calls if c[0] == "AutoTokenizer"][-1:]
    assert all(path == str(actor) and rev == "v9" for _, path, _, rev in loads), calls


@pytest.mark.usefixtures("in_process_world")
@pytest.mark.parametrize(("args", "needles"), [
    (["model.dtype=float64"], ["model.dtype", "'float64'", "'auto'", "'bfloat16'"]),
    (["model.dtype=bfloat16"], ["model.dtype", "'bfloat16'", "deepspeed.dtype='fp32'"]),
    (["model.dtype=float32", "deepspeed.dtype=bf16"], ["model.dtype", "'float32'", "deepspeed.dtype='bf16'"]),
    (["model.attn_implementation=flash"], ["model.attn_implementation", "'flash'", "'sdpa'"]),
    (["model.attn_implementation=a/b/c"], ["model.attn_implementation", "'a/b/c'"]),
    (["model.gradient_checkpointing=sometimes"], ["model.gradient_checkpointing", "sometimes"]),
    (["model.trust_remote_code=2"], ["model.trust_remote_code", "2"]),
    (["model.revision=v 1"], ["model.revision", "'v 1'"]),
])
def test_bad_model_settings_are_rejected_by_name(args: list[str], needles: list[str], tmp_path: Path) -> None:
    line = the_error(invoke(["run", *args, "--out", tmp_path / "o"]))
    for n in needles:
        assert n in line, (n, line)


@pytest.fixture()
def two_label_classifier(tmp_path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
    return tmp_path / "two"


@pytest.mark.usefixtures("in_process_world")
def test_classifier_with_two_labels_is_no_reward_model(two_label_classifier: Path, tmp_path: Path) -> None:
    line = the_error(invoke(["run", "--reward-model", two_label_classifier, "--out", tmp_path / "o"]))
    for n in ("--reward-model", str(two_label_classifier), "num_labels=2"):
        assert n in line, (n, line)


@pytest.mark.usefixtures("in_process_world")
def test_rm_stage_refuses_a_trained_reward_model(tmp_path: Path) -> None:
    """--stage rm would train a reward model that stage 3 never uses (it scores with the trained one)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    line = the_error(invoke(["run", "--stage", "rm", "--reward-model", tmp_path / "rm", "--out", tmp_path / "o", *TINY]))
    for n in ("model.reward_model", str(tmp_path / "rm"), "trained reward model"):
        assert n in line, (n, line)


def test_foreign_reward_model_with_a_smaller_vocabulary_is_refused(run_dir: Path, tmp_path: Path, rlhf) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "small")
    out = tmp_path / "out"
    shutil.copytree(run_dir / "sft", out / "sft")
    proc = rlhf(["run", "--stage", "ppo", "--out", out, "--reward-model", tmp_path / "small", *TINY])
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in ("model.reward_model", str(tmp_path / "small"), "vocab_size 100", "tokenizer"):
        assert n in errors[0], (n, errors[0])
