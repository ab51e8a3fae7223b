"""Shared timing helpers for the benchmarks in `bench/` (CPU or CUDA).

Timing protocol (the project owners' anchor methodology, robust on small shared machines):

* Every variant is warmed up, then calibrated so that one *block* of `iters` back-to-back calls lasts at least
  `block_s` seconds (at least one call).
* Measurement runs in `rounds` rounds. In each round every variant runs one block, in an order rotated by one
  each round, so slow drifts of the machine (thermal, frequency, noisy neighbours) hit all variants alike.
* Each block also records how many cores *other* processes used meanwhile (hypervisor steal included):
  busy jiffies of the machine from `/proc/stat` minus this process's own jiffies from `/proc/self/stat`.
  A round with at least `QUIET_THRESHOLD` foreign cores is *contended* and is left out of medians and ratios,
  as long as at least `MIN_QUIET_ROUNDS` quiet rounds remain (otherwise every round is used and the report says
  how many were quiet). When fewer than `rounds` rounds were quiet for all variants, up to `rounds` extra rounds
  are run. `wait_quiet_s` > 0 also waits (up to that long) for the machine to go quiet before each block.
* Per variant: the median over rounds of (block time / iters). A ratio between two variants is the median of
  the per-round ratios, both measured in the same round.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_ALIASES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16"}

QUIET_THRESHOLD = 0.3  # cores used by other processes (and steal) above which a round counts as contended
MIN_QUIET_ROUNDS = 3
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

CpuSnapshot = tuple[int, int, int] | None


# ---------------------------------------------------------------------------------------------- device and env
def dtype_name(name: str) -> str:
    """Canonical dtype name ("fp32" / "bf16") for a CLI spelling; raises `argparse.ArgumentTypeError`."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}, got {name!r}")
    return name


def setup_device(device: str, threads: int | None) -> torch.device:
    """Resolve `--device` and apply `--threads` (CPU). On CUDA, TF32 is switched off so that fp32 means fp32."""
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev


def sync(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_supported(device: torch.device, dtype: torch.dtype, backward: bool) -> str | None:
    """None when a small linear layer runs in `dtype` on `device` (and backpropagates, if `backward`), else why not."""
    try:
        lin = torch.nn.Linear(16, 16).to(device=device, dtype=dtype)
        x = torch.randn(4, 16, device=device, dtype=dtype, requires_grad=backward)
        y = torch.nn.functional.silu(lin(x)).sum()
        if backward:
            y.backward()
        sync(device)
    except (RuntimeError, NotImplementedError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return None


def cpu_model_name() -> str:
    """`lscpu`'s model name, else /proc/cpuinfo's, else `platform.processor()`."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CPU_FLAGS_THAT_MATTER = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_kind() -> str | None:
    """Vendor, family and model from /proc/cpuinfo, e.g. "AuthenticAMD family 26 model 2": a KVM guest's model
    name is often just "AMD EPYC", and two generations of one name choose kernels differently."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:  # the end of the first processor's block
                break
    except OSError:
        return None
    if not fields:
        return None
    return f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def cpu_flags_that_matter() -> list[str]:
    """Which of `CPU_FLAGS_THAT_MATTER` /proc/cpuinfo lists (they decide the CPU kernels: bench/RESULTS.md)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS_THAT_MATTER if f in flags]
    except OSError:
        pass
    return []


def library_fingerprint() -> dict[str, Any]:
    """Which `modeling_moe` was measured: its folder, the git commit and whether it differs from it, and a
    sha256 over its .py files (the benchmarks may run while the library is being edited)."""
    import hashlib

    import modeling_moe

    folder = Path(modeling_moe.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    info: dict[str, Any] = {"path": str(folder), "sha256": digest.hexdigest()[:16]}
    try:
        git = ["git", "-C", str(folder)]
        run = dict(capture_output=True, text=True, check=True, timeout=10)
        info["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--", "."], **run).stdout
        info["uncommitted_changes"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def env_info(device: torch.device) -> dict[str, Any]:
    """Versions, machine, date and the measured library's fingerprint, recorded with every result."""
    import transformers

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": cpu_model_name(),
        "cpu_kind": cpu_kind(),
        "cpu_flags": cpu_flags_that_matter(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["modeling_moe"] = library_fingerprint()
    return info


# ---------------------------------------------------------------------------------------------- foreign CPU load
def _cpu_snapshot() -> CpuSnapshot:
    """(busy jiffies of the whole machine without steal, jiffies of this process, steal jiffies), or None."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime + stime of all threads
        return user + nice + system + irq + softirq, own, steal
    except (OSError, ValueError, IndexError):
        return None


def _other_load(s0: CpuSnapshot, s1: CpuSnapshot, seconds: float) -> float:
    """Average number of cores used by other processes (plus hypervisor steal) between two snapshots."""
    if s0 is None or s1 is None or seconds <= 0:
        return float("nan")
    busy, own, steal = (b - a for a, b in zip(s0, s1))
    return max(0.0, busy - own + steal) / _CLK_TCK / seconds


def wait_until_quiet(max_wait_s: float, probe_s: float = 0.1) -> float:
    """Sleep-probe until other processes use fewer than `QUIET_THRESHOLD` cores, for at most `max_wait_s`.

    Returns the foreign load of the last probe (cores).
    """
    deadline = time.perf_counter() + max_wait_s
    while True:
        s0, t0 = _cpu_snapshot(), time.perf_counter()
        time.sleep(probe_s)
        load = _other_load(s0, _cpu_snapshot(), time.perf_counter() - t0)
        if not load >= QUIET_THRESHOLD or time.perf_counter() >= deadline:
            return load


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Per-round timings of one variant: seconds per call and foreign cores during that round's block."""

    name: str
    times: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)
    iters: int = 0
    error: str | None = None

    def _quiet_mask(self) -> list[bool]:
        mask = [not o >= QUIET_THRESHOLD for o in self.other]
        return mask if sum(mask) >= MIN_QUIET_ROUNDS else [True] * len(self.times)

    @property
    def used(self) -> list[float]:
        """The per-call times the statistics use: quiet rounds if there are enough, else all rounds."""
        return [t for t, ok in zip(self.times, self._quiet_mask()) if ok]

    @property
    def quiet_rounds(self) -> int:
        return sum(not o >= QUIET_THRESHOLD for o in self.other)

    @property
    def median(self) -> float:
        return statistics.median(self.used) if self.times else float("nan")

    @property
    def best(self) -> float:
        return min(self.times) if self.times else float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-friendly record (milliseconds)."""
        return {
            "median_ms": self.median * 1e3,
            "min_ms": self.best * 1e3,
            "max_ms": max(self.used) * 1e3 if self.times else float("nan"),
            "iters_per_block": self.iters,
            "rounds": len(self.times),
            "quiet_rounds": self.quiet_rounds,
            "times_ms": [t * 1e3 for t in self.times],
            "other_cores": self.other,
            "error": self.error,
        }


def _time_block(fn: Callable[[], object], iters: int, device: torch.device) -> tuple[float, float]:
    sync(device)
    s0, t0 = _cpu_snapshot(), time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    seconds = time.perf_counter() - t0
    return seconds, _other_load(s0, _cpu_snapshot(), seconds)


def _quiet_rounds(results: dict[str, Timing], names: list[str]) -> int:
    """Rounds so far in which every variant's block was quiet."""
    per_round = zip(*(results[n].other for n in names))
    return sum(all(not o >= QUIET_THRESHOLD for o in loads) for loads in per_round)


def bench_interleaved(
    variants: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    warmup: int = 2,
    block_s: float = 0.3,
    wait_quiet_s: float = 0.0,
    verbose: bool = True,
) -> dict[str, Timing]:
    """Time zero-argument callables interleaved, round by round (see the module docstring).

    A variant that raises during warm-up is recorded with `error` set and left out of the rounds.
    `wait_quiet_s` > 0: before each block, wait up to that long for other processes to go quiet.
    When fewer than `rounds` rounds were quiet for every variant, up to `rounds` extra rounds are run.
    """
    results = {name: Timing(name) for name in variants}
    live: dict[str, Callable[[], object]] = {}
    for name, fn in variants.items():
        try:
            for _ in range(warmup):
                fn()
            one_call, _ = _time_block(fn, 1, device)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
            results[name].error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            if verbose:
                print(f"    [skip ] {name}: {results[name].error}", flush=True)
            continue
        results[name].iters = max(1, min(1000, int(block_s / max(one_call, 1e-7)) + 1)) if one_call < block_s else 1
        live[name] = fn
        if verbose:
            calib = f"one call {one_call * 1e3:9.2f} ms -> {results[name].iters} per block"
            print(f"    [calib] {name:<24s} {calib}", flush=True)
        gc.collect()
    names = list(live)
    r = 0
    while names and (r < rounds or (r < 2 * rounds and _quiet_rounds(results, names) < rounds)):
        # after `rounds` rounds, up to `rounds` extra ones replace rounds lost to contention
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if wait_quiet_s > 0:
                wait_until_quiet(wait_quiet_s)
            timing = results[name]
            seconds, other = _time_block(live[name], timing.iters, device)
            timing.times.append(seconds / timing.iters)
            timing.other.append(other)
        r += 1
    if verbose and names:
        quiet = ", ".join(f"{n} {results[n].quiet_rounds}/{len(results[n].times)}" for n in names)
        print(f"    [noise] quiet rounds: {quiet}", flush=True)
    return results


def ratio(num: Timing, den: Timing) -> tuple[float, float, float]:
    """(median, min, max) over rounds of num/den, both timed in the same round.

    Uses the rounds in which both blocks were quiet when there are at least `MIN_QUIET_ROUNDS`, else all rounds.
    """
    if not num.times or not den.times:
        return float("nan"), float("nan"), float("nan")
    pairs = list(zip(num.times, den.times, num.other, den.other))
    quiet = [(a, b) for a, b, oa, ob in pairs if not oa >= QUIET_THRESHOLD and not ob >= QUIET_THRESHOLD]
    use = quiet if len(quiet) >= MIN_QUIET_ROUNDS else [(a, b) for a, b, _, _ in pairs]
    values = [a / b for a, b in use]
    return statistics.median(values), min(values), max(values)


def fastest(results: dict[str, Timing], prefix: str) -> Timing | None:
    """The variant named `prefix...` with the lowest median, or None if none ran."""
    candidates = [t for n, t in results.items() if n.startswith(prefix) and t.times]
    return min(candidates, key=lambda t: t.median) if candidates else None


# ---------------------------------------------------------------------------------------------- output
def add_common_args(parser: argparse.ArgumentParser, rounds: int, block_s: float) -> None:
    """Flags every benchmark shares: device, threads, rounds, block length, quiet waiting, JSON output."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"interleaved timing rounds (default: {rounds})")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant before calibration")
    parser.add_argument("--block-s", type=float, default=block_s, help="minimum seconds per timed block")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        metavar="S",
        help="before each timed block wait up to S seconds for other processes to use < 0.3 cores "
        "(default: 30; 0 = never wait, contended rounds are still left out)",
    )
    parser.add_argument("--json", metavar="OUT", default=None, help="write all results to this JSON file")


def save_json(path: str, obj: object) -> None:
    """Write `obj` as indented JSON, creating the parent folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    print(f"wrote {out}", flush=True)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ratio(r: tuple[float, float, float]) -> str:
    """'1.23 [1.10..1.40]' for a (median, min, max) ratio."""
    med, lo, hi = r
    return "n/a" if med != med else f"{med:.2f} [{lo:.2f}..{hi:.2f}]"
