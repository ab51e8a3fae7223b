"""Smoke runs of the benchmarks on the CPU (`--quick`): they run end to end, check ours against transformers before
timing, and print their tables. The GPU scripts run with `--device cpu`.

These only show that the scripts work; no figure is checked here (timings are never asserted in tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, timeout: int = 120) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # so moe_triton is skipped on the CPU
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_gpu_block_benchmark_cpu_smoke(tmp_path):
    out_json = tmp_path / "block.json"
    out = _run("bench_gpu_block.py", "--device", "cpu", "--quick", "--json", str(out_json))
    for text in (
        "ours vs Mixtral worst rel.err",
        "-- fwd",
        "-- fwdbwd",
        "dense-equal",
        "ceiling:grouped_mm",
        "hf:grouped_mm",
        "hf:eager",
        "ours:eager",
        "x dense-equal",
        "ours best (ours:",
        "TFLOP/s (fraction of dense-equal throughput), bf16:",
        "| shape (d, f, E, k, T) | mode | dense-equal |",
        "ours / hf best",
        "target >= 0.80",
        "ours:moe_triton skipped",
    ):
        assert text in out, text
    result = json.loads(out_json.read_text())
    ours = result["ours_impls"]
    assert "eager" in ours and "moe_triton" not in ours  # Triton kernels need CUDA
    assert [(r["shape"], r["mode"]) for r in result["results"]] == [("tiny", "fwd"), ("tiny", "fwdbwd")]
    for row in result["results"]:
        assert row["ours_best"] in [f"ours:{impl}" for impl in ours]
        for name in ("dense-equal", "ceiling:grouped_mm", "hf:grouped_mm", "hf:eager", *(f"ours:{i}" for i in ours)):
            assert row["variants"][name]["error"] is None, (name, row["variants"][name]["error"])
            assert row["variants"][name]["median_ms"] > 0
        for impl in ours:
            errs = row["check_rel_err"][impl]
            assert set(errs) == {"grouped_mm", "eager"} and max(max(e.values()) for e in errs.values()) < 3e-2


def test_gpu_model_benchmark_cpu_smoke(tmp_path):
    out_json = tmp_path / "model.json"
    out = _run("bench_gpu_model.py", "--device", "cpu", "--quick", "--no-compile", "--json", str(out_json))
    for text in (
        "ours == Mixtral logits: fp32 rel.err",
        "=== training step (fwd+bwd+AdamW)",
        "peak memory n/a",
        "=== greedy decoding: batch 1",
        "=== greedy decoding: batch 4",
        "ours:eager static (no compile)",
        "ours:eager dynamic",
        "mixtral:grouped_mm dynamic",
        "mixtral:eager dynamic",
        "mixtral:grouped_mm static (no compile)",
        "mixtral:eager static (no compile)",
        "target >= 2.0x at no more peak memory",
        "target >= 10x",
        "| variant | tokens/s | MFU | peak memory | ms/step |",
        "| variant | new tok/s | ms |",
    ):
        assert text in out, text
    result = json.loads(out_json.read_text())
    ours = result["ours_impls"]
    assert "eager" in ours and "moe_triton" not in ours  # Triton kernels need CUDA
    assert result["logits_check"]["fp32_rel_err"] <= 1e-4
    trained = [r["variant"] for r in result["train"]["rows"]]
    assert trained == [*(f"ours:{i}+lm_loss_chunk_size=4096" for i in ours), "mixtral:grouped_mm", "mixtral:eager"]
    assert all(r["error"] is None and r["tok_s"] > 0 and r["peak_mem_gb"] is None for r in result["train"]["rows"])
    for batch in ("1", "4"):
        rows = result["decode"]["batches"][batch]["rows"]
        assert len(rows) == 2 * len(ours) + 4 and all(r["error"] is None and r["tok_s"] > 0 for r in rows), rows
        assert all(r["compiled"] is False for r in rows if "static" in r["variant"])  # --no-compile
        assert result["decode"]["batches"][batch]["reference_tokens"] == "mixtral:grouped_mm dynamic"


def test_cpu_block_benchmark_smoke(tmp_path):
    out_json = tmp_path / "block.json"
    out = _run("bench_block.py", "--quick", "--wait-quiet", "0", "--json", str(out_json), timeout=300)
    for text in ("ours / dense-equal", "ceiling:presorted / dense", "| tiny (256, 704, 8, 2, 2048) | fp32 | fwd |"):
        assert text in out, text
    rows = json.loads(out_json.read_text())["results"]
    assert {(r["dtype"], r["mode"]) for r in rows} == {(d, m) for d in ("fp32", "bf16") for m in ("fwd", "fwdbwd")}
    assert all(r["floor_over_dense"] is None for r in rows)  # 512 rows per expert: no weight-bytes floor


def test_cpu_block_benchmark_decode_shape_times_the_weight_bytes_floor():
    args = ("--shapes", "decode", "--dtypes", "fp32", "--modes", "fwd", "--rounds", "2", "--warmup", "1")
    out = _run("bench_block.py", *args, "--block-s", "0.02", "--wait-quiet", "0", timeout=300)
    assert "floor:weight-bytes / dense" in out
    assert "| decode-sized (512, 1408, 8, 2, 8) | fp32 | fwd |" in out


def test_cpu_model_benchmark_smoke(tmp_path):
    out_json = tmp_path / "model.json"
    small = ("--layers", "2", "--hidden", "64", "--ffn", "96", "--vocab", "256", "--no-gen-compile")
    out = _run("bench_model.py", "--quick", "--wait-quiet", "0", *small, "--json", str(out_json), timeout=300)
    for text in ("training step (fwd+bwd+AdamW)", "ours vs fastest Mixtral", "greedy continuation identical"):
        assert text in out, text
    result = json.loads(out_json.read_text())
    assert all(result["gen"]["same_continuation"].values()), result["gen"]["same_continuation"]
    if Path("/proc/cpuinfo").exists():  # every result names the CPU kind it was measured on
        assert result["env"]["cpu_kind"] and " family " in result["env"]["cpu_kind"], result["env"]


def _git_checkout() -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _git_checkout(), reason="not a git checkout")
def test_ab_benchmark_smoke(tmp_path):
    out_json = tmp_path / "ab.json"
    out = _run("bench_ab.py", "--quick", "--wait-quiet", "0", "--json", str(out_json), timeout=300)
    assert "| tiny fp32 | fwd |" in out and "new / old" in out
    result = json.loads(out_json.read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert result["rev"] == head.strip()
    (row,) = result["results"]
    assert row["rel_err"] <= 1e-5 and row["timings"]["new"]["rounds"] >= 3


@pytest.mark.skipif(not _git_checkout(), reason="not a git checkout")
def test_ab_benchmark_names_a_bad_revision():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_ab.py"), "--rev", "no-such-revision", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "--rev 'no-such-revision'" in proc.stderr
