"""Command-line plumbing shared by every entry point (`training.*`, `eval`): one line per user error, exit status 2.

    parser = CliParser((MyArguments,), prog="python -m training.x")   # or CliArgumentParser for plain argparse
    def main(argv=None):
        (args,) = parser.parse(argv)
        ...
    if __name__ == "__main__":
        run_cli(main, prog="python -m training.x")

A user error (a bad argument, a missing or unusable file: `UsageError`, our argument / config / data error classes
and the file-system errors listed in `USER_ERRORS`) ends the program with exit status 2 and one line on stderr,
`prog: error: <message>`, where the message names the argument or file and what is allowed. Any other exception
is a bug and keeps its traceback. `MOE_DEBUG=1` in the environment shows the traceback of user errors too.

This module does not travel with saved models (no modeling file imports it); it imports only the standard library,
transformers' `HfArgumentParser` and this package's config error, so both `training` and `eval` can use it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import HfArgumentParser

from .checkpoint import CheckpointError
from .configuration_moe import MoeConfigError
from .hub import UnsafeOutputError

DEBUG_ENV = "MOE_DEBUG"


class UsageError(ValueError):
    """A command-line argument or path is unusable; the message names it and says what is allowed."""


# Exceptions that mean "the user asked for something impossible", not "the program is wrong".
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    MoeConfigError,
    CheckpointError,  # a broken checkpoint (missing / unexpected / wrong-shape tensors, unreadable shard, ...)
    UnsafeOutputError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def _unknown_arguments(parser: argparse.ArgumentParser, remaining: Sequence[str]) -> UsageError:
    """A `UsageError` for leftover command-line tokens, with the closest known flag for each misspelled one."""
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    parts = []
    for token in remaining:
        flag = token.split("=", 1)[0]
        close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.75) if flag.startswith("-") else []
        parts.append(f"{token} (did you mean {close[0]}?)" if close else token)
    return UsageError(f"unrecognized arguments: {', '.join(parts)}; see --help")


class _OneLineErrors:
    """argparse's `error` raises `UsageError` instead of printing the usage and exiting (`run_cli` prints it)."""

    def error(self, message: str):  # argparse.ArgumentParser API
        raise UsageError(message)


class CliArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are `UsageError`s; `parse` rejects unknown arguments with a hint."""

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        args, remaining = self.parse_known_args(argv)
        if remaining:
            raise _unknown_arguments(self, remaining)
        return args


class CliParser(_OneLineErrors, HfArgumentParser):
    """transformers' `HfArgumentParser` whose errors are `UsageError`s.

    `parse(argv)` returns the dataclasses like `parse_args_into_dataclasses`; an unknown or misspelled flag, a
    value argparse cannot convert, and a `ValueError` raised by a dataclass's `__post_init__` (TrainingArguments
    checks many combinations there) all become `UsageError`s.
    """

    def parse(self, argv: Sequence[str] | None = None) -> tuple:
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            *parsed, remaining = self.parse_args_into_dataclasses(
                args=argv, return_remaining_strings=True, look_for_args_file=False
            )
        except UsageError:
            raise
        except ValueError as err:  # a dataclass __post_init__ refused a value
            raise UsageError(str(err)) from err
        if remaining:
            raise _unknown_arguments(self, remaining)
        return tuple(parsed)


def one_line(err: BaseException) -> str:
    """The exception's message on one line (continuation lines joined with ' | ')."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError):  # KeyError's str is the repr of its key
        text = str(err.args[0]) if err.args else text
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def run_cli(
    main: Callable[[list[str] | None], object],
    prog: str,
    argv: Sequence[str] | None = None,
    user_errors: tuple[type[BaseException], ...] = (),
) -> object:
    """Run `main(argv)`; a user error (`USER_ERRORS` + `user_errors`) exits 2 with one `prog: error: ...` line.

    With `MOE_DEBUG=1` in the environment the exception propagates (full traceback). Other exceptions always
    propagate. Returns what `main` returns.
    """
    try:
        return main(None if argv is None else list(argv))
    except (*USER_ERRORS, *user_errors) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def check_device(device: str, argument: str) -> None:
    """Check that `device` names a torch device this machine has (e.g. "cuda" on a CPU-only build is refused).

    Raises:
        UsageError: naming `argument`, the device and what is available here.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"{argument}: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from err
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    count = backend.device_count() if backend is not None and backend.is_available() else 0
    if count == 0 or (dev.index is not None and dev.index >= count):
        here = ["cpu"]
        if torch.accelerator.is_available():
            kind = torch.accelerator.current_accelerator().type
            here.append(f"{kind} (0..{torch.accelerator.device_count() - 1})")
        raise UsageError(
            f"{argument}: {device!r} is not available on this machine (torch {torch.__version__}); available: "
            f"{', '.join(here)}"
        )


def check_output_dir(path: str | os.PathLike, argument: str) -> Path:
    """Check, before any work, that a folder can be created or written: it is a folder (or absent) and a folder
    can be created in it (or in its first existing ancestor).

    Raises:
        UsageError: naming `argument`.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{argument}: {str(out)!r} exists and is not a folder")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{argument}: cannot create {str(out)!r}: {str(probe)!r} is a file, not a folder")
    try:  # a real write (os.access says yes to root everywhere, also on read-only file systems)
        tempfile.TemporaryDirectory(prefix=".write-test-", dir=probe).cleanup()
    except OSError as err:
        raise UsageError(f"{argument}: {str(out)!r} cannot be written ({str(probe)!r}: {err.strerror or err})") from err
    return out


__all__ = [
    "DEBUG_ENV",
    "USER_ERRORS",
    "CliArgumentParser",
    "CliParser",
    "UsageError",
    "check_device",
    "check_output_dir",
    "one_line",
    "run_cli",
]
