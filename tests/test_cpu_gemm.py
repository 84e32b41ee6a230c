"""tp_engine.kernels.cpu_gemm: the AVX2 skinny GEMMs against float64 references.

Error bounds. Every output is a sum computed in float32 in a fixed order:
per 8-lane vector a chain of FMAs (one rounding each) over ceil(K / 8)
steps, three levels of horizontal adds, then scale / offset / bias. The
classic bound for such a sum is |y_hat - y| <= gamma_n * sum_k |x_k w_k| with
gamma_n = n u / (1 - n u), u = 2^-24 and n the longest chain of roundings
any term goes through. The tests use that bound (times 1.01) with n
counted for each kernel below, against the exact value computed in float64
(the references' "dequantize, then matmul", the dequantized weight itself
being rounded to float32 once or twice, which adds to n). The bound is
rigorous, not a fudge factor; the observed errors sit far below it.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from tp_engine.kernels import cpu_gemm
from tp_engine.kernels import reference as ref

U = 2.0 ** -24
native = pytest.mark.skipif(not cpu_gemm.available(), reason="cpu_gemm kernels unavailable (no cc / AVX2 / FMA)")
PLANS = [(rr, mc) for rr in (1, 2, 4) for mc in range(1, 9)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check(y: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, n: int, what: str) -> None:
    """|y - exact| <= 1.01 * gamma_n * magnitude, elementwise."""
    assert y.dtype == torch.float32 and y.shape == exact.shape, what
    tol = 1.01 * n * U / (1 - n * U) * magnitude
    err = (y.double() - exact).abs()
    bad = err > tol
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} outputs out of bound, worst err {err.max().item():.3g} "
        f"(err/tol max {(err / tol.clamp_min(1e-300)).max().item():.3g})"
    )


def _bias(n: int, with_bias: bool, g: torch.Generator) -> torch.Tensor | None:
    return torch.randn(n, generator=g) if with_bias else None


def _bias64(bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()


# ------------------------------------------------------------------ float32

F32_SHAPES = [  # (M, N, K): K not a multiple of 8, N odd, N below the 4 row streams, M up to 16
    (1, 1, 1), (1, 3, 7), (2, 5, 9), (3, 33, 13), (4, 97, 64), (5, 7, 100), (7, 129, 577),
    (8, 64, 576), (9, 17, 31), (12, 255, 288), (15, 2, 1000), (16, 61, 33),
]


@native
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,n,k", F32_SHAPES)
def test_linear_f32_vs_float64(m: int, n: int, k: int, with_bias: bool) -> None:
    g = _gen(m * 1000 + n * 10 + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    bias = _bias(n, with_bias, g)
    y = cpu_gemm.linear_f32(x, w, bias)
    exact = x.double() @ w.double().T + _bias64(bias, n)
    magnitude = x.double().abs() @ w.double().abs().T + _bias64(bias, n).abs()
    n_round = math.ceil(k / 8) + 3 + 1  # FMA chain, horizontal adds, bias
    _check(y, exact, magnitude, n_round, f"linear_f32 M={m} N={n} K={k}")
    # torch (MKL) meets the same kind of bound in its own order: the two differ by at most both
    _check(y, F.linear(x, w, bias).double(), 2 * magnitude, n_round + k, "linear_f32 vs F.linear")


@native
def test_linear_f32_every_plan_and_row_invariance() -> None:
    """Every register blocking gives the same bits, and row i does not depend on M or the other rows."""
    g = _gen(7)
    for n, k in [(3, 13), (37, 577), (64, 40), (5, 8)]:
        w, x, bias = torch.randn(n, k, generator=g), torch.randn(16, k, generator=g), torch.randn(n, generator=g)
        single = torch.cat([cpu_gemm.linear_f32(x[i : i + 1], w, bias) for i in range(16)])
        exact = x.double() @ w.double().T + bias.double()
        magnitude = x.double().abs() @ w.double().abs().T + bias.double().abs()
        _check(single, exact, magnitude, math.ceil(k / 8) + 4, f"linear_f32 N={n} K={k}")
        for m in (1, 2, 3, 5, 8, 11, 16):
            xm = x[:m].contiguous()
            assert torch.equal(cpu_gemm.linear_f32(xm, w, bias), single[:m])  # default plan
            for plan in PLANS:
                assert torch.equal(cpu_gemm.linear_f32(xm, w, bias, plan=plan), single[:m]), (n, k, m, plan)


@native
def test_linear_f32_values_past_a_row_do_not_leak() -> None:
    """The last K % 8 inputs are masked: NaN in the next row of x, or in the next row of w, stays out."""
    g = _gen(3)
    for k in (1, 5, 13, 22):
        x, w = torch.randn(2, k, generator=g), torch.randn(6, k, generator=g)
        x[1] = float("nan")
        w[5] = float("nan")
        y = cpu_gemm.linear_f32(x, w)
        assert torch.isfinite(y[0, :5]).all() and torch.isnan(y[1]).all() and torch.isnan(y[:, 5]).all()
        torch.testing.assert_close(y[0, :5], (x[0].double() @ w[:5].double().T).float(), rtol=1e-5, atol=1e-5)


@native
def test_out_argument() -> None:
    g = _gen(11)
    x, w, bias = torch.randn(3, 20, generator=g), torch.randn(9, 20, generator=g), torch.randn(9, generator=g)
    out = torch.full((3, 9), 123.0)
    y = cpu_gemm.linear_f32(x, w, bias, out=out)
    assert y is out and torch.equal(out, cpu_gemm.linear_f32(x, w, bias))
    q8 = cpu_gemm.Int8Weight.from_canonical(*ref.quantize_int8(w))
    assert cpu_gemm.linear_int8(x, q8, bias, out=out) is out
    assert torch.equal(out, cpu_gemm.linear_int8(x, q8, bias))
    q4 = cpu_gemm.Int4Weight.from_canonical(*ref.quantize_int4(w, 4), 4)
    assert cpu_gemm.linear_int4(x, q4, bias, out=out) is out
    assert torch.equal(out, cpu_gemm.linear_int4(x, q4, bias))


# ------------------------------------------------------------------ int8

I8_SHAPES = [(1, 1, 1), (1, 7, 9), (2, 33, 16), (3, 5, 100), (5, 97, 577), (8, 64, 576), (13, 31, 40), (16, 3, 1)]


def _int8_reference(x, q, scale, bias):
    """exact (float64) dequantize-then-matmul, with the float32 dequantized weight, and the magnitude."""
    wq = ref.dequantize_int8(q, scale).double()  # q * scale rounded to float32, as the reference does
    n = q.shape[0]
    exact = x.double() @ wq.T + _bias64(bias, n)
    magnitude = x.double().abs() @ wq.abs().T + _bias64(bias, n).abs()
    return exact, magnitude


@native
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,n,k", I8_SHAPES)
def test_linear_int8_vs_reference(m: int, n: int, k: int, with_bias: bool) -> None:
    g = _gen(m * 1000 + n * 10 + k + 1)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    if n > 2:
        w[1] = 0.0  # an all-zero row: scale 0
    q, scale = ref.quantize_int8(w)
    bias = _bias(n, with_bias, g)
    prepared = cpu_gemm.Int8Weight.from_canonical(q, scale)
    y = cpu_gemm.linear_int8(x, prepared, bias)
    exact, magnitude = _int8_reference(x, q, scale, bias)
    # FMA chain over ceil(K/8) steps, 3 horizontal adds, * scale, + bias; +1: the
    # reference's float32 rounding of q * scale
    n_round = math.ceil(k / 8) + 3 + 3
    _check(y, exact, magnitude, n_round, f"linear_int8 M={m} N={n} K={k}")
    _check(y, ref.int8_matmul(x, q, scale, bias).double(), 2 * magnitude, n_round + k, "vs reference.int8_matmul")


@native
def test_linear_int8_every_plan_and_row_invariance() -> None:
    g = _gen(5)
    for n, k in [(3, 13), (37, 577), (64, 40)]:
        q, scale = ref.quantize_int8(torch.randn(n, k, generator=g))
        prepared = cpu_gemm.Int8Weight.from_canonical(q, scale)
        x = torch.randn(16, k, generator=g)
        single = torch.cat([cpu_gemm.linear_int8(x[i : i + 1], prepared) for i in range(16)])
        exact, magnitude = _int8_reference(x, q, scale, None)
        _check(single, exact, magnitude, math.ceil(k / 8) + 6, f"linear_int8 N={n} K={k}")
        for m in (1, 2, 4, 7, 9, 16):
            xm = x[:m].contiguous()
            for plan in PLANS:
                assert torch.equal(cpu_gemm.linear_int8(xm, prepared, plan=plan), single[:m]), (n, k, m, plan)


@native
def test_int8_weight_layout() -> None:
    q, scale = ref.quantize_int8(torch.randn(5, 13))
    p = cpu_gemm.Int8Weight.from_canonical(q, scale)
    assert p.shape == (5, 13) and p.kp == 16 and p.data.shape == (5, 16)
    assert torch.equal(p.data[:, :13], q) and not p.data[:, 13:].any()
    q16, s16 = ref.quantize_int8(torch.randn(4, 16))
    assert cpu_gemm.Int8Weight.from_canonical(q16, s16).data.data_ptr() == q16.data_ptr()  # no copy needed
    assert "Int8Weight" in repr(p) and p.nbytes == 5 * 16 + 4 * 5
    c = p.clone()
    assert c.data.data_ptr() != p.data.data_ptr() and torch.equal(c.data, p.data) and torch.equal(c.scale, p.scale)
    with pytest.raises(AttributeError):
        p.data = c.data  # the kernel trusts the checked sizes: read-only


# ------------------------------------------------------------------ int4

I4_CASES = [  # (M, N, K, group_size): groups not multiples of 16, one group per row, N odd
    (1, 1, 2, 2), (1, 7, 12, 6), (2, 9, 32, 32), (3, 33, 48, 24), (4, 5, 576, 64), (5, 97, 576, 32),
    (6, 13, 256, 128), (8, 64, 576, 64), (9, 3, 40, 40), (16, 17, 288, 96),
]


def _int4_reference(x, packed, scale, offset, gs, bias):
    """exact (float64) dequantize-then-matmul and the magnitude sum_k |x_k| (|u s| + |o|) + |bias|."""
    n, k = packed.shape[0], packed.shape[1] * 2
    wq = ref.dequantize_int4(packed, scale, offset, gs).double()  # u * s + o, rounded twice in float32
    u = ref.unpack_int4(packed).double().reshape(n, k // gs, gs)
    absw = (u * scale.double().abs()[..., None] + offset.double().abs()[..., None]).reshape(n, k)
    exact = x.double() @ wq.T + _bias64(bias, n)
    magnitude = x.double().abs() @ absw.T + _bias64(bias, n).abs()
    return exact, magnitude


def _int4_rounds(k: int, gs: int) -> int:
    """Roundings a term goes through: per group the FMA chain over the padded group (2 per 16
    inputs) and the sets' sum, one FMA per group into the total (or cvt(u) * scale), the group
    sums of x and the offsets' FMAs, 3 horizontal adds, the bias, and the reference's 2
    roundings of u * s + o."""
    gp = -(-gs // 16) * 16
    groups = k // gs
    return (gp // 8 + 3) + groups + (gs // 8 + 8) + math.ceil(groups / 8) + 3 + 1 + 2


@native
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,n,k,gs", I4_CASES)
def test_linear_int4_vs_reference(m: int, n: int, k: int, gs: int, with_bias: bool) -> None:
    g = _gen(m * 1000 + n * 10 + k + gs)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    w[0, :gs] = 0.25  # a constant group: scale 0, offset exact
    packed, scale, offset = ref.quantize_int4(w, gs)
    bias = _bias(n, with_bias, g)
    prepared = cpu_gemm.Int4Weight.from_canonical(packed, scale, offset, gs)
    y = cpu_gemm.linear_int4(x, prepared, bias)
    exact, magnitude = _int4_reference(x, packed, scale, offset, gs, bias)
    n_round = _int4_rounds(k, gs)
    _check(y, exact, magnitude, n_round, f"linear_int4 M={m} N={n} K={k} g={gs}")
    _check(y, ref.int4_matmul(x, packed, scale, offset, gs, bias).double(), 2 * magnitude, n_round + k,
           "vs reference.int4_matmul")


@native
def test_linear_int4_every_plan() -> None:
    """int4 results may differ in the last bits between plans (two ways to apply the scale), all within the bound."""
    g = _gen(9)
    for n, k, gs in [(3, 48, 24), (37, 576, 64), (64, 256, 128)]:
        packed, scale, offset = ref.quantize_int4(torch.randn(n, k, generator=g), gs)
        prepared = cpu_gemm.Int4Weight.from_canonical(packed, scale, offset, gs)
        x = torch.randn(16, k, generator=g)
        exact, magnitude = _int4_reference(x, packed, scale, offset, gs, None)
        for m in (1, 2, 5, 16):
            xm = x[:m].contiguous()
            for plan in PLANS:
                y = cpu_gemm.linear_int4(xm, prepared, plan=plan)
                _check(y, exact[:m], magnitude[:m], _int4_rounds(k, gs), f"int4 N={n} K={k} M={m} plan={plan}")


@native
def test_int4_weight_layout() -> None:
    """Byte i of each 16 inputs holds input i (low nibble) and i + 8 (high); groups padded to 16."""
    n, k, gs = 3, 48, 24
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=_gen(1))
    scale, offset = torch.rand(n, k // gs), torch.rand(n, k // gs)
    p = cpu_gemm.Int4Weight.from_canonical(ref.pack_int4(u), scale, offset, gs)
    assert p.shape == (n, k) and p.gp == 32
    head = p.data[:, :16].contiguous().view(torch.float32).reshape(n, 2, 2)
    assert torch.equal(head[:, 0], scale) and torch.equal(head[:, 1], offset)
    nib = p.data[:, 16:].reshape(n, 2, 2, 8)  # (row, group, 16-step, byte)
    lo, hi = nib & 0x0F, nib >> 4
    padded = torch.zeros(n, 2, 32, dtype=torch.uint8)
    padded[:, :, :gs] = u.reshape(n, 2, gs)
    steps = padded.reshape(n, 2, 2, 16)
    assert torch.equal(lo, steps[..., :8]) and torch.equal(hi, steps[..., 8:])
    assert p.nbytes == p.data.numel() and "group_size=24" in repr(p)
    c = p.clone()
    assert c.data.data_ptr() != p.data.data_ptr() and torch.equal(c.data, p.data) and c.group_size == 24


# ------------------------------------------------------------------ threads, bad input, no compiler


@native
def test_concurrent_calls() -> None:
    """The GIL is released during a call: two threads at once still get their own results."""
    g = _gen(2)
    w = torch.randn(257, 96, generator=g)
    q8 = cpu_gemm.Int8Weight.from_canonical(*ref.quantize_int8(w))
    xs = [torch.randn(3, 96, generator=g) for _ in range(2)]
    want = [(cpu_gemm.linear_f32(x, w), cpu_gemm.linear_int8(x, q8)) for x in xs]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(50):
            if not (torch.equal(cpu_gemm.linear_f32(xs[i], w), want[i][0])
                    and torch.equal(cpu_gemm.linear_int8(xs[i], q8), want[i][1])):
                errors.append(f"thread {i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@native
def test_bad_inputs_raise() -> None:
    x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    q8 = cpu_gemm.Int8Weight.from_canonical(*ref.quantize_int8(w))
    q4 = cpu_gemm.Int4Weight.from_canonical(*ref.quantize_int4(w, 4), 4)
    bad_calls = {
        "x float64": lambda: cpu_gemm.linear_f32(x.double(), w),
        "x 1-D": lambda: cpu_gemm.linear_f32(x[0], w),
        "x 3-D": lambda: cpu_gemm.linear_f32(x[None], w),
        "x not contiguous": lambda: cpu_gemm.linear_f32(torch.randn(8, 2).T, w),
        "x no rows": lambda: cpu_gemm.linear_f32(torch.randn(0, 8), w),
        "x 17 rows": lambda: cpu_gemm.linear_f32(torch.randn(17, 8), w),
        "x wrong K": lambda: cpu_gemm.linear_f32(torch.randn(2, 9), w),
        "x meta": lambda: cpu_gemm.linear_f32(torch.empty(2, 8, device="meta"), w),
        "x not a tensor": lambda: cpu_gemm.linear_f32([[1.0] * 8], w),
        "w int": lambda: cpu_gemm.linear_f32(x, w.int()),
        "w not contiguous": lambda: cpu_gemm.linear_f32(x, torch.randn(8, 4).T),
        "w empty": lambda: cpu_gemm.linear_f32(x, torch.randn(0, 8)),
        "bias length": lambda: cpu_gemm.linear_f32(x, w, torch.randn(5)),
        "bias dtype": lambda: cpu_gemm.linear_f32(x, w, b.double()),
        "bias 2-D": lambda: cpu_gemm.linear_f32(x, w, b[None]),
        "out shape": lambda: cpu_gemm.linear_f32(x, w, out=torch.empty(2, 5)),
        "out dtype": lambda: cpu_gemm.linear_f32(x, w, out=torch.empty(2, 4, dtype=torch.float64)),
        "out overlaps x": _overlap_call,
        "plan rows": lambda: cpu_gemm.linear_f32(x, w, plan=(3, 1)),
        "plan mc": lambda: cpu_gemm.linear_f32(x, w, plan=(4, 9)),
        "int8 prepared type": lambda: cpu_gemm.linear_int8(x, q4),
        "int8 x wrong K": lambda: cpu_gemm.linear_int8(torch.randn(2, 7), q8),
        "int8 bias": lambda: cpu_gemm.linear_int8(x, q8, torch.randn(3)),
        "int4 prepared type": lambda: cpu_gemm.linear_int4(x, q8),
        "int4 x dtype": lambda: cpu_gemm.linear_int4(x.half(), q4),
        "int4 out": lambda: cpu_gemm.linear_int4(x, q4, out=torch.empty(4, 2)),
        "Int8Weight q float": lambda: cpu_gemm.Int8Weight.from_canonical(w, torch.ones(4)),
        "Int8Weight scale shape": lambda: cpu_gemm.Int8Weight.from_canonical(q8.data, torch.ones(3)),
        "Int8Weight scale dtype": lambda: cpu_gemm.Int8Weight.from_canonical(q8.data, torch.ones(4).double()),
        "Int4Weight packed dtype": lambda: cpu_gemm.Int4Weight.from_canonical(
            torch.zeros(4, 4, dtype=torch.int8), torch.ones(4, 2), torch.ones(4, 2), 4),
        "Int4Weight odd group": lambda: cpu_gemm.Int4Weight.from_canonical(
            torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 2), torch.ones(4, 2), 3),
        "Int4Weight group not dividing K": lambda: cpu_gemm.Int4Weight.from_canonical(
            torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 1), torch.ones(4, 1), 6),
        "Int4Weight scale shape": lambda: cpu_gemm.Int4Weight.from_canonical(
            torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 1), torch.ones(4, 2), 4),
        "Int4Weight group bool": lambda: cpu_gemm.Int4Weight.from_canonical(
            torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 4), torch.ones(4, 4), True),
        "Int8Weight raw data shape": lambda: cpu_gemm.Int8Weight(4, 8, 8, q8.data[:3].contiguous(), q8.scale),
        "Int8Weight raw kp": lambda: cpu_gemm.Int8Weight(4, 8, 16, q8.data, q8.scale),
        "Int4Weight raw data shape": lambda: cpu_gemm.Int4Weight(4, 8, 4, 16, q4.data[:, 1:].contiguous()),
        "Int4Weight raw gp": lambda: cpu_gemm.Int4Weight(4, 8, 4, 4, q4.data),
    }
    for what, call in bad_calls.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"no ValueError for {what}")


def _overlap_call() -> torch.Tensor:
    buf = torch.zeros(4, 4)
    return cpu_gemm.linear_f32(buf[:2], torch.randn(4, 4), out=buf[1:3])


def test_available_is_a_bool_and_unavailable_path_raises() -> None:
    """With the native helper disabled, available() is False and the kernels raise a clear RuntimeError."""
    assert isinstance(cpu_gemm.available(), bool)
    code = (
        "import torch\n"
        "from tp_engine.kernels import cpu_gemm\n"
        "assert cpu_gemm.available() is False\n"
        "try:\n"
        "    cpu_gemm.linear_f32(torch.ones(1, 4), torch.ones(2, 4))\n"
        "except RuntimeError as e:\n"
        "    assert 'available()' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = dict(os.environ, TP_ENGINE_GEMM_NO_C="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
