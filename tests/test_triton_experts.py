"""The Triton SwiGLU experts (forward and backward) against a plain per-assignment loop and `grouped_experts_forward`.

Without a GPU the kernels run in triton's CPU interpreter, which `@triton.jit` selects at decoration time from
TRITON_INTERPRET=1. Other tests may already have imported `modeling_moe.triton_experts` without it, so the interpreter
cases run in one subprocess started with TRITON_INTERPRET=1 (this module's `_run_interpreter_cases`), which checks that
the kernels really are interpreted and reports each case; a test per case reads its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.test_experts import reference_loop

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (T, D, I, E, K, drop, bias, dtype); shapes mostly not multiples of the 16-wide interpreter blocks.
CASES = {
    "E4_K2": (19, 16, 24, 4, 2, False, False, "float32"),
    "E8_K1_block_multiples": (32, 32, 48, 8, 1, False, False, "float32"),
    "E8_K3_drop_bias": (37, 24, 40, 8, 3, True, True, "float32"),
    "E4_K2_drop": (40, 20, 36, 4, 2, True, False, "float32"),
    "E4_K3_bias_few_rows": (5, 12, 20, 4, 3, False, True, "float32"),
    "E8_K1_drop": (23, 28, 44, 8, 1, True, False, "float32"),
    "E4_K2_float16": (20, 16, 24, 4, 2, True, True, "float16"),
}


def _inputs(T, D, I, E, K, drop, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    gate_up = torch.randn(E, 2 * I, D, generator=g) / D**0.5
    down = torch.randn(E, D, I, generator=g) / I**0.5
    b1 = torch.randn(E, 2 * I, generator=g) * 0.1 if bias else None
    b2 = torch.randn(E, D, generator=g) * 0.1 if bias else None
    weights, indices = torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, dim=-1)
    if drop:
        indices = indices.masked_fill(torch.rand(T, K, generator=g) < 0.3, E)
        indices[0] = E  # a token with every assignment dropped
        indices[indices == E - 1] = E  # an expert with no rows
    tensors = [t.to(dtype) if t is not None else None for t in (x, gate_up, down, b1, b2)]
    return tensors, indices, weights


def _check_case(T, D, I, E, K, drop, bias, dtype_name):
    """Forward and every gradient against the reference loop (float64) and `grouped_experts_forward`."""
    from modeling_moe.experts import grouped_experts_forward
    from modeling_moe.triton_experts import triton_experts_forward

    dtype = getattr(torch, dtype_name)
    tensors, indices, weights = _inputs(T, D, I, E, K, drop, bias, dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    def leaves(dt):
        params = [t.detach().to(dt).requires_grad_() if t is not None else None for t in tensors]
        return params, weights.detach().to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()

    (x, w1, w2, b1, b2), w = leaves(dtype)
    got = triton_experts_forward(x, w1, w2, indices, w, F.silu, b1, b2)
    assert got.dtype == dtype and got.shape == (T, D)
    (rx, rw1, rw2, rb1, rb2), rw = leaves(torch.float64)
    expected = reference_loop(rx, rw1, rw2, indices, rw, rb1, rb2)
    (gx, gw1, gw2, gb1, gb2), gw = leaves(torch.float32)
    grouped = grouped_experts_forward(gx, gw1, gw2, indices, gw, F.silu, gb1, gb2)

    upstream = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got.double(), expected, **tol)
    torch.testing.assert_close(got.float(), grouped, **tol)
    names = ["x", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias", "routing_weights"]
    got_grads = torch.autograd.grad(got, [t for t in (x, w1, w2, b1, b2, w) if t is not None], upstream.to(dtype))
    exp_grads = torch.autograd.grad(
        expected, [t for t in (rx, rw1, rw2, rb1, rb2, rw) if t is not None], upstream.double()
    )
    grp_grads = torch.autograd.grad(grouped, [t for t in (gx, gw1, gw2, gb1, gb2, gw) if t is not None], upstream)
    present = [n for n, t in zip(names, (x, w1, w2, b1, b2, w)) if t is not None]
    for name, g, e, r in zip(present, got_grads, exp_grads, grp_grads):
        assert g.dtype == (torch.float32 if name == "routing_weights" else dtype), name
        torch.testing.assert_close(g.double(), e, **tol, msg=lambda m, name=name: f"{name} vs loop: {m}")
        torch.testing.assert_close(g.float(), r, **tol, msg=lambda m, name=name: f"{name} vs grouped: {m}")
    if drop:
        assert torch.equal(got[0], torch.zeros_like(got[0])), "a fully dropped token must get exact zeros"
        _, dw1, dw2 = got_grads[:3]
        assert torch.equal(dw1[E - 1], torch.zeros_like(dw1[E - 1])), "expert with no rows: dW1 must be exact zero"
        assert torch.equal(dw2[E - 1], torch.zeros_like(dw2[E - 1])), "expert with no rows: dW2 must be exact zero"
        if bias:
            db1, db2 = got_grads[3:5]
            assert torch.equal(db1[E - 1], torch.zeros_like(db1[E - 1]))
            assert torch.equal(db2[E - 1], torch.zeros_like(db2[E - 1]))


def _check_registered_interface():
    """`experts_implementation="moe_triton"` on the library's experts module gives the eager (reference) result."""
    from modeling_moe import MoeConfig
    from modeling_moe.experts import MoeExperts

    config = MoeConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        mlp_bias=True,
    )
    experts = MoeExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(11, 16)
    weights, indices = torch.softmax(torch.randn(11, 4), -1).topk(2, dim=-1)
    config._experts_implementation = "eager"
    expected = experts(x, indices, weights)
    config._experts_implementation = "moe_triton"
    got = experts(x, indices, weights)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    got.sum().backward()
    assert experts.gate_up_proj_bias.grad is not None and experts.down_proj.grad is not None


def _run_interpreter_cases() -> None:
    """Subprocess entry point (TRITON_INTERPRET=1): run every case, print one JSON report."""
    import modeling_moe.triton_experts as te

    report = {"kernel_type": type(te._gate_up_swiglu_kernel).__name__}
    report["available_on_cpu"] = te.triton_available(torch.zeros(1))
    checks = {name: (lambda args=args: _check_case(*args)) for name, args in CASES.items()}
    checks["registered_interface"] = _check_registered_interface
    for name, check in checks.items():
        try:
            check()
            report[name] = "ok"
        except Exception:
            report[name] = traceback.format_exc()
    print("REPORT " + json.dumps(report))


def _subprocess(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_overrides}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def interpreter_report():
    proc = _subprocess(
        "import tests.test_triton_experts as m; m._run_interpreter_cases()", TRITON_INTERPRET="1", PYTHONHASHSEED="0"
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"interpreter subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("REPORT ") :])


def test_subprocess_runs_the_triton_interpreter(interpreter_report):
    assert interpreter_report["kernel_type"] == "InterpretedFunction"
    assert interpreter_report["available_on_cpu"] is True


@pytest.mark.parametrize("case", [*CASES, "registered_interface"])
def test_triton_experts_match_reference_in_interpreter(interpreter_report, case):
    assert interpreter_report[case] == "ok", interpreter_report[case]


def test_imports_without_triton_and_reports_unavailable():
    code = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError
import torch
import torch.nn.functional as F
import modeling_moe.triton_experts as te
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
assert te.triton is None
assert te.triton_available(torch.zeros(1)) is False
try:
    te.triton_experts_forward(torch.zeros(2, 4), torch.zeros(2, 6, 4), torch.zeros(2, 4, 3),
                              torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), F.silu)
except RuntimeError as e:
    assert "triton" in str(e), e
else:
    raise AssertionError("no error without triton")
assert "moe_triton" not in ALL_EXPERTS_FUNCTIONS
print("OK")
"""
    proc = _subprocess(code, TRITON_INTERPRET="1")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_unsupported_activation_and_device_raise(monkeypatch):
    from modeling_moe.triton_experts import triton_available, triton_experts_forward

    args = (torch.zeros(2, 4), torch.zeros(2, 6, 4), torch.zeros(2, 4, 3), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="SwiGLU only"):
        triton_experts_forward(*args, torch.ones(2, 1), F.gelu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_available(torch.zeros(1)) is False
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        triton_experts_forward(*args, torch.ones(2, 1), torch.nn.SiLU())


def test_registered_with_transformers_experts_interface():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    import modeling_moe.triton_experts as te

    assert ALL_EXPERTS_FUNCTIONS["moe_triton"] is te._moe_triton_experts


def test_kernels_compile_for_sm90_bf16(tmp_path):
    """Ahead-of-time compile of every kernel variant the bf16 GPU path launches, for sm_90 (no GPU needed, but
    triton's ptxas). Catches lowering errors the interpreter cannot see; it does not run them."""
    import triton

    try:
        ptxas = triton.knobs.nvidia.ptxas.path
    except Exception:  # no usable ptxas: nothing to compile with
        ptxas = None
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip("triton's ptxas is not available")
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import modeling_moe.triton_experts as te

def compile_(fn, consts):
    sig = {n: "constexpr" if n in consts else ("*i64" if n.endswith(("slot_ptr", "start_ptr", "group_ptr", "row_ptr"))
           else "*bf16" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

mnk = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, DOT_PRECISION="tf32")
compile_(te._gate_up_swiglu_kernel, dict(HAS_BIAS=True, **mnk))
compile_(te._grouped_gemm_scatter_kernel, dict(HAS_BIAS=True, **mnk))
compile_(te._swiglu_backward_kernel, mnk)
for lg, rg, sw in ((1, 0, True), (0, 2, False)):
    compile_(te._expert_weight_grad_kernel, dict(L_GATHER=lg, R_GATHER=rg, R_SWIGLU=sw, BIAS_SUM=True,
             BLOCK_M=64, BLOCK_N=64, BLOCK_R=64, DOT_PRECISION="tf32"))
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_grouped_experts_forward(dtype):
    from modeling_moe.experts import grouped_experts_forward
    from modeling_moe.triton_experts import triton_experts_forward

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the CUDA test runs compiled kernels")
    torch.manual_seed(0)
    T, D, I, E, K = 300, 136, 200, 8, 2
    tensors, indices, weights = _inputs(T, D, I, E, K, True, True, torch.float32)
    tensors = [t.cuda().to(dtype) for t in tensors]
    indices, weights = indices.cuda(), weights.cuda()
    results = []
    for fn in (triton_experts_forward, grouped_experts_forward):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        w = weights.detach().clone().requires_grad_()
        y = fn(leaves[0], leaves[1], leaves[2], indices, w, F.silu, leaves[3], leaves[4])
        grads = torch.autograd.grad(y, [*leaves, w], torch.ones_like(y))
        results.append((y, *grads))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got.float(), expected.float(), **tol)
