"""The tool demo as a data source (``--data tool-demo``): :class:`rlhf_data.tool_demo.ToolAdditionTask`'s
problems and imperfect multi-turn demonstrations, split into the stages' sets.

* ``sft`` / ``sft_eval``: one :class:`SFTRecord` per demonstration; ``response`` is the final model turn
  (what a single-turn reader sees) and ``meta["turns"]`` the whole demonstration as ``[role, text]``
  pairs, which the CLI's SFT stage lays out with :func:`rlhf_data.tool_demo.demonstration_example`
  (each turn tokenized on its own, the tool's turns out of the labels).
* ``rl`` / ``rl_valid`` / ``rl_eval``: prompts whose ``meta`` holds the operands ``a`` and ``b`` (what
  ``rlhf_algos.calculator.CalculatorEnv.reset`` reads).
* no reward-model pairs: the environment's verifier gives the reward.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .errors import DataError
from .records import PromptRecord, SFTRecord
from .sources import SourceAdapter

__all__ = ["ToolDemoSource"]


class ToolDemoSource(SourceAdapter):
    """The built-in tool demo: 4-5 digit additions with a calculator tool (docs/environments.md)."""

    name: ClassVar[str] = "tool-demo"
    eval_split = None
    record_kind = "mixed"
    description = ("The built-in tool demo: 4-5 digit addition with a calculator tool, multi-turn SFT "
                   "demonstrations and a ground-truth verifier, generated in-process (docs/environments.md).")
    example = '{"prompt": "What is 12345 + 6789?", "response": "19134", "turns": [["model", "<calc>12345+6789</calc>"], ' \
              '["tool", "<result>19134</result>"], ["model", "19134"]]}'
    reads_data = False
    OPTIONS: ClassVar[dict[str, type]] = {"num_sft": int, "num_sft_eval": int, "num_rl": int, "num_valid": int,
                                          "num_eval": int, "skip_tool": float, "copy_error": float,
                                          "wrong_operands": float, "stage_split": str}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(cls.OPTIONS)

    def read(self, location: str, split: str | None):
        raise DataError("source 'tool-demo' is generated in-process; it takes no file or dataset")

    def _options(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_sft": 3000, "num_sft_eval": 100, "num_rl": 2000, "num_valid": 50, "num_eval": 100}
        for key, value in self.options.items():
            if key == "stage_split":
                if value not in ("", None):
                    raise DataError(f"data.split: {value!s} is not allowed for the tool-demo source; its sets have "
                                    f"their own sizes (options num_sft, num_rl, num_valid, num_eval); use data.split=''")
                continue
            try:
                kw[key] = self.OPTIONS[key](value)
            except (TypeError, ValueError):
                raise DataError(f"source 'tool-demo': option {key}={value!r} is not a {self.OPTIONS[key].__name__}") from None
        for key in ("num_sft", "num_sft_eval", "num_rl", "num_valid", "num_eval"):  # a negative one would slice
            if kw[key] < 1:
                raise DataError(f"source 'tool-demo': option {key}={kw[key]!r} is not allowed; allowed: >= 1")
        return kw

    def load_stages(self, seed: int):
        from .stages import StagedParts
        from .tool_demo import ToolAdditionTask, ToolTaskConfig, verify_answer

        kw = self._options()
        n_sft, n_sft_eval, n_valid = kw.pop("num_sft"), kw.pop("num_sft_eval"), kw.pop("num_valid")
        n_eval = kw.pop("num_eval")
        try:
            task = ToolAdditionTask(ToolTaskConfig(num_sft=n_sft + n_sft_eval, num_eval=n_valid + n_eval, seed=seed,
                                                   **kw))
        except ValueError as e:
            raise DataError(f"source 'tool-demo': {e}") from None
        sft = [SFTRecord(q, turns[-1][1], {**m, "turns": [list(t) for t in turns], "kind": kind})
               for (q, turns, kind), (_, m) in zip(task.demonstrations(), task.prompts("sft"), strict=True)]
        held = [PromptRecord(q, m) for q, m in task.prompts("eval")]
        return StagedParts(
            sft=sft[:n_sft], rm=[], rl=[PromptRecord(q, m) for q, m in task.prompts("rl")], sft_eval=sft[n_sft:],
            rm_eval=[], rl_valid=held[:n_valid], rl_eval=held[n_valid:],
            corpus=task.corpus()[:n_sft],  # the SFT demonstrations' texts (not the held-out ones)
            verifier=verify_answer,
        )
