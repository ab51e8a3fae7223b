"""A real English text corpus that needs no download: the docstrings of Python's standard library.

Used offline by the demo and the tests (to train a tokenizer and a tiny model) and by `python -m eval` (its default
perplexity text), so it sits below both `training` and `eval`. The text is written as one document per paragraph
to a plain-text file that `datasets.load_dataset("text", ...)` reads.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path

# Modules whose import has side effects (GUI, network, interpreter state) or that are slow: skipped.
_SKIP = re.compile(
    r"^(idlelib|tkinter|turtle|turtledemo|antigravity|this|test|lib2to3|ensurepip|venv|__main__|pydoc_data)"
)


def stdlib_paragraphs(max_chars: int = 2_000_000, min_chars: int = 80) -> list[str]:
    """Paragraphs of English prose from stdlib docstrings, deterministic for a given Python version.

    Args:
        max_chars: stop once this many characters are collected.
        min_chars: drop paragraphs shorter than this (signatures, one-liners).
    Returns:
        A list of paragraphs, whitespace-normalised, without duplicates.
    """
    seen: set[str] = set()
    out: list[str] = []
    total = 0
    names = sorted(n for n in sys.stdlib_module_names if not _SKIP.match(n) and not n.startswith("_"))
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:
            continue
        objects = [module] + [
            obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj) or inspect.isfunction(obj)
        ]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                if len(text) < min_chars or text in seen or text.startswith((">>>", "..")):
                    continue
                seen.add(text)
                out.append(text)
                total += len(text)
                if total >= max_chars:
                    return out
    return out


def write_corpus(path: str | Path, max_chars: int = 2_000_000) -> Path:
    """Write `stdlib_paragraphs(max_chars)` to `path`, one paragraph per line, atomically.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(stdlib_paragraphs(max_chars)) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
