"""Preflight: what ``rlhf run`` and ``rlhf chat`` check before any model is built or trained.

1. The output directory: a non-empty path that is (or can be made) a directory, and writable (a
   probe file is created and removed).
2. Free space for the checkpoints the run will write: parameters x bytes per parameter (the
   ``deepspeed.dtype`` the weights are saved in) for each model directory the stages save, plus a
   margin for tokenizer files and run cards. Free space is read through :func:`free_bytes`, which
   tests replace.
3. Model directories (``model.actor_model``, ``model.reward_model``, ``rlhf chat --model``): a
   readable ``config.json`` that transformers accepts, weights whose safetensors header is intact and
   fits the file, and (for a policy) a tokenizer that loads.

Each problem is one line naming the setting, the path and what is wrong; :class:`PreflightError`
carries them all (the CLI prints each as an ``error:`` line).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

__all__ = ["PreflightError", "check_model_dir", "check_out_dir", "estimate_checkpoint_bytes", "free_bytes",
           "preflight_run"]

MiB = 1024 * 1024
# per saved model directory, besides the weights: tokenizer files, run card, metrics
_DIR_OVERHEAD = 4 * MiB
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class PreflightError(ValueError):
    """One or more problems found before training (one line each)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (an existing directory)."""
    return shutil.disk_usage(path).free


def _mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


def check_out_dir(out: str, what: str = "--out") -> list[str]:
    """Problems with ``out`` as the run's output directory (it is created when missing)."""
    if not out or not out.strip():
        return [f"{what}: '' is empty; give a directory to write to, e.g. --out rlhf-out"]
    p = Path(out).expanduser()
    for parent in [p, *p.parents]:
        if parent.exists() and not parent.is_dir():
            return [f"{what}: {str(p)!r}: {str(parent)!r} exists and is not a directory"]
        if parent.exists():
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".rlhf-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return [f"{what}: {str(p)!r} is not writable: {e.strerror or e}"]
    return []


def _safetensors_params(path: Path) -> int:
    """Element count of a safetensors file, from its header; ValueError if it is cut short or malformed."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * MiB:
            raise ValueError(f"header length {n} does not fit the file ({size} bytes): corrupt or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("the header is not valid JSON: corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object: corrupt or not safetensors")
    end, params = 0, 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = t["data_offsets"]
            params += math.prod(t["shape"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {name!r} has a malformed header entry") from None
        end = max(end, stop)
    if 8 + n + end > size:
        raise ValueError(f"truncated: the header needs {8 + n + end} bytes, the file has {size}")
    return params


def _weights_params(d: Path) -> int:
    """Parameters of the weights in model directory ``d`` (ValueError naming the file when unreadable)."""
    files = sorted(d.glob("*.safetensors"))
    files = [f for f in files if f.name != "value_head.safetensors"] or files
    if files:
        total = 0
        for f in files:
            try:
                total += _safetensors_params(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"{f}: {e}") from None
        return total
    bins = sorted(d.glob("pytorch_model*.bin"))
    if bins:
        return sum(b.stat().st_size for b in bins) // 4  # an estimate: no header to read without unpickling
    raise ValueError(f"no weights (none of {', '.join(_WEIGHT_FILES)})")


def check_model_dir(key: str, path: str, *, tokenizer: bool, trust_remote_code: bool = False,
                    revision: str | None = None) -> tuple[list[str], int | None]:
    """Problems with model directory ``path`` (set by ``key``) and its parameter count (None: unknown).

    A hub name (not a local path) is checked only for being in the local cache (at ``revision``) when the hub
    is offline. ``trust_remote_code``: model.trust_remote_code, for a model with its own code.
    """
    from rlhf_hybrid import resolve_model_path

    try:
        local = Path(resolve_model_path(path))
    except FileNotFoundError as e:
        return [f"{key}: {e}"], None
    if not local.is_dir():
        return _check_hub_name(key, path, revision), None
    problems = []
    try:
        json.loads((local / "config.json").read_text(encoding="utf-8"))
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(local), trust_remote_code=trust_remote_code)
        labels = config.num_labels
        if any(a.endswith("ForSequenceClassification") for a in config.architectures or []) and labels != 1:
            problems.append(f"{key}: {str(local)!r} is a sequence-classification model with num_labels={labels}; a "
                            f"reward model has one output (num_labels=1)")
    except (OSError, ValueError, KeyError) as e:
        problems.append(f"{key}: {str(local / 'config.json')!r} is not a valid model config: {' '.join(str(e).split())[:300]}")
    params = None
    try:
        params = _weights_params(local)
    except (OSError, ValueError) as e:
        problems.append(f"{key}: {str(local)!r}: weights: {e}")
    if tokenizer and not problems:
        problems += _check_tokenizer(key, local, trust_remote_code)
    return problems, params


def _check_tokenizer(key: str, local: Path, trust_remote_code: bool = False) -> list[str]:
    if not any((local / f).is_file() for f in _TOKENIZER_FILES):
        return [f"{key}: {str(local)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})"]
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(local), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - tokenizers raise many types for a broken file
        return [f"{key}: {str(local)!r}: the tokenizer does not load: {' '.join(str(e).split())[:300]}"]
    return []


def _check_hub_name(key: str, name: str, revision: str | None = None) -> list[str]:
    """A hub name: fine online (transformers downloads it); offline it must be in the local cache."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True", "YES", "yes"):
        return []
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision or None)
    except Exception:  # noqa: BLE001 - an invalid repo id
        cached = None
    if not isinstance(cached, str):
        return [f"{key}: {name!r} is neither a local directory nor in the Hugging Face cache, and the hub is offline "
                f"(HF_HUB_OFFLINE=1)"]
    return []


def _tiny_params(cfg) -> int:
    """Parameters of the demo's tiny Llama (tied embeddings) at the largest vocabulary it can get."""
    m = cfg.model
    from .data_report import tiny_vocab_size

    h, layers = m.hidden_size, m.num_layers
    return tiny_vocab_size(cfg) * h + layers * (4 * h * h + 3 * h * m.intermediate_size + 2 * h) + h


def estimate_checkpoint_bytes(cfg, stages: list[str], actor_params: int | None,
                              reward_params: int | None) -> tuple[int, str]:
    """Bytes the model directories of ``stages`` take (weights in ``deepspeed.dtype`` plus a margin) and
    how that was counted, for the message. Unknown parameter counts (a hub model) count as 0."""
    per_param = 2 if cfg.deepspeed.dtype in ("bf16", "fp16") else 4
    actor = actor_params if actor_params is not None else (0 if cfg.model.actor_model else _tiny_params(cfg))
    reward = reward_params if reward_params is not None else actor
    sizes = {stage: (reward if stage == "rm" else actor) * per_param + _DIR_OVERHEAD for stage in stages}
    how = ", ".join(f"{stage} {_mib(n)}" for stage, n in sizes.items())
    return sum(sizes.values()), f"{len(sizes)} model directories: {how}; {per_param} bytes per parameter"


def preflight_run(cfg, stages: list[str]) -> None:
    """Check the output directory, its free space and the model directories of a run; raise
    :class:`PreflightError` listing every problem (one line each)."""
    problems = check_out_dir(cfg.out)
    actor_params = reward_params = None
    m = cfg.model
    remote = {"trust_remote_code": m.trust_remote_code}
    if m.actor_model:
        found, actor_params = check_model_dir("--actor-model (model.actor_model)", m.actor_model, tokenizer=True,
                                              revision=m.revision, **remote)
        problems += found
    if m.reward_model:
        found, reward_params = check_model_dir("--reward-model (model.reward_model)", m.reward_model, tokenizer=False,
                                               revision=m.revision, **remote)
        problems += found
    sft_dir = Path(cfg.out).expanduser() / "sft"
    if not problems and "sft" not in stages and (sft_dir / "config.json").is_file():  # a later stage's input
        found, sft_params = check_model_dir(f"--stage {stages[0]} input", str(sft_dir), tokenizer=True, **remote)
        problems += found
        actor_params = sft_params if actor_params is None else actor_params
    if not problems:
        need, how = estimate_checkpoint_bytes(cfg, stages, actor_params, reward_params)
        out = Path(cfg.out).expanduser()
        free = free_bytes(out)
        if free < need:
            problems.append(f"--out: {str(out)!r} has {_mib(free)} free; this run writes about {_mib(need)} of "
                            f"checkpoints ({how}); free some space or choose another --out")
    if problems:
        raise PreflightError(problems)


def preflight_chat(model: str) -> None:
    """``rlhf chat --model``: a complete, loadable model directory with its tokenizer."""
    problems, _ = check_model_dir("--model", model, tokenizer=True)
    if problems:
        raise PreflightError(problems)
