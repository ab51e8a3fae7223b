"""The harness's input error (kept free of heavy imports, so that `eval.lm_eval_adapter` runs without this
repository's `modeling_moe` package, e.g. on a model folder with remote code only)."""

from __future__ import annotations


class EvalInputError(ValueError):
    """A harness input is unusable; the message names the argument (or path) and what is allowed."""


__all__ = ["EvalInputError"]
