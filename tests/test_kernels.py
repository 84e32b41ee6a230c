"""Triton kernels against their torch references, and the references against plain math.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported), with tiny shapes: it executes every program
instance in numpy, slowly. Shapes are chosen to hit the edges: K not a
multiple of the block (64 for int8; int4 groups smaller than, equal to and
larger than its 32-element step), N not a multiple of the 64-row block,
M = 1 and M > 1 (and M > 16, a second row block).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton (triton.jit reads it at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tp_engine.kernels import reference as ref
from tp_engine.kernels import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="triton not installed, or triton imported before TRITON_INTERPRET=1 could be set",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _kernels():
    from tp_engine.kernels import load_triton

    return load_triton()


def _tol(dtype: torch.dtype) -> dict:
    # Kernel and reference both accumulate in float32 but in different
    # orders; the result is then rounded once to x's dtype, so allow a couple
    # of ulps of that dtype relative to the output's scale.
    return {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-2),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-1)}[dtype]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype == dtype
    scale = expected.float().abs().max().item()
    tol = _tol(dtype)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale / 100))


# ------------------------------------------------------------- references vs plain math


@pytest.mark.parametrize("shape", [(7, 10), (33, 130), (1, 64)])
def test_int8_quantize_roundtrip_and_reference(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * 0.3
    w[0] = 0.0  # an all-zero row: scale 0, codes 0, exact
    q, scale = ref.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
    assert int(q.abs().max()) <= 127
    deq = ref.dequantize_int8(q, scale)
    assert torch.equal(deq[0], torch.zeros(shape[1]))
    # Every weight within half a step of its row's grid; the row max is on it.
    assert bool(((deq - w).abs() <= scale[:, None] / 2 + 1e-7).all())
    assert bool((q[1:].abs().amax(1) == 127).all())
    x = torch.randn(3, shape[1], generator=g)
    bias = torch.randn(shape[0], generator=g)
    plain = x.double() @ deq.double().T + bias.double()
    torch.testing.assert_close(ref.int8_matmul(x, q, scale, bias).double(), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,group", [((5, 12), 4), ((9, 64), 32), ((3, 60), 60), ((8, 40), 10)])
def test_int4_quantize_roundtrip_and_reference(shape, group):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=g)
    w[1, :group] = 0.75  # a constant group: exact
    packed, scale, offset = ref.quantize_int4(w, group)
    n, k = shape
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    assert scale.shape == offset.shape == (n, k // group)
    # Layout: element 2j in the low nibble of byte j, 2j+1 in the high one.
    u = ref.unpack_int4(packed)
    assert torch.equal(packed, (u[:, 0::2] | (u[:, 1::2] << 4)))
    assert torch.equal(ref.pack_int4(u), packed)
    deq = ref.dequantize_int4(packed, scale, offset, group)
    plain = (u.float().view(n, k // group, group) * scale[..., None] + offset[..., None]).view(n, k)
    torch.testing.assert_close(deq, plain, rtol=0, atol=0)
    assert torch.equal(deq[1, :group], torch.full((group,), 0.75))
    steps = scale.repeat_interleave(group, dim=1)
    assert bool(((deq - w).abs() <= steps / 2 + 1e-6).all())
    # Group min and max are on the grid.
    groups = w.view(n, k // group, group)
    torch.testing.assert_close(deq.view(n, k // group, group).amin(-1), groups.amin(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(deq.view(n, k // group, group).amax(-1), groups.amax(-1), rtol=1e-6, atol=1e-5)
    x = torch.randn(2, 3, k, generator=g)  # extra batch dim
    bias = torch.randn(n, generator=g)
    expected = x.double() @ deq.double().T + bias.double()
    torch.testing.assert_close(ref.int4_matmul(x, packed, scale, offset, group, bias).double(), expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_reference_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
        norm.weight.data = (torch.randn(48, generator=g) * 0.5 + 1).to(dtype)
        x = (torch.randn(2, 5, 48, generator=g) * 3).to(dtype)
        r = (torch.randn(2, 5, 48, generator=g) * 3).to(dtype)
        out, res = ref.rms_norm(x, norm.weight.data, 1e-5)
        assert torch.equal(out, norm(x)) and res is x
        out, res = ref.rms_norm(x, norm.weight.data, 1e-5, residual=r)
        h = r + x  # HF's decoder: residual + branch output, in the model dtype
        assert torch.equal(res, h)
        assert torch.equal(out, norm(h))


def test_reference_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        ref.quantize_int8(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        ref.quantize_int8(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="inf or nan"):
        ref.quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="does not divide"):
        ref.quantize_int4(torch.randn(2, 12), 8)
    with pytest.raises(ValueError, match="even"):
        ref.quantize_int4(torch.randn(2, 12), 3)
    with pytest.raises(ValueError, match="0..15"):
        ref.pack_int4(torch.tensor([[16, 0]]))


# ------------------------------------------------------------- Triton vs reference


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 70, 100, True), (5, 33, 130, False), (17, 8, 100, True)])
def test_int8_kernel(dtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n)
    w = torch.randn(n, k, generator=g)
    q, scale = ref.quantize_int8(w)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    q, scale, x = q.to(DEVICE), scale.to(DEVICE), x.to(DEVICE)
    b = b.to(DEVICE) if b is not None else None
    got = _kernels().int8_matmul(x, q, scale, b)
    _close(got.cpu(), ref.int8_matmul(x, q, scale, b).cpu(), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m,n,k,group,bias",
    [(1, 70, 100, 10, True), (3, 33, 128, 64, False), (2, 16, 192, 96, True), (18, 5, 40, 40, False)],
)
def test_int4_kernel(dtype, m, n, k, group, bias):
    g = torch.Generator().manual_seed(m * 1000 + k)
    w = torch.randn(n, k, generator=g)
    packed, scale, offset = ref.quantize_int4(w, group)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    args = [t.to(DEVICE) for t in (x, packed, scale, offset)]
    b = b.to(DEVICE) if b is not None else None
    got = _kernels().int4_matmul(*args, group, b)
    _close(got.cpu(), ref.int4_matmul(*args, group, b).cpu(), dtype)


@needs_triton
def test_matmul_kernels_keep_leading_dims():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, generator=g).to(DEVICE)
    q, scale = (t.to(DEVICE) for t in ref.quantize_int8(torch.randn(6, 32, generator=g)))
    assert _kernels().int8_matmul(x, q, scale).shape == (2, 3, 6)
    codes = [t.to(DEVICE) for t in ref.quantize_int4(torch.randn(6, 32, generator=g), 16)]
    assert _kernels().int4_matmul(x, *codes, 16).shape == (2, 3, 6)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_kernel(dtype, residual):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 50, generator=g) * 2).to(dtype).to(DEVICE)  # 50: not a power of two
    w = (torch.randn(50, generator=g) * 0.5 + 1).to(dtype).to(DEVICE)
    r = (torch.randn(3, 50, generator=g) * 2).to(dtype).to(DEVICE) if residual else None
    out, res = _kernels().rms_norm(x, w, 1e-6, r)
    exp_out, exp_res = ref.rms_norm(x, w, 1e-6, r)
    assert torch.equal(res.cpu(), exp_res.cpu())  # one rounded add: bit exact
    assert out.dtype == exp_out.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, exp_out, rtol=1e-6, atol=1e-6)
    else:
        # float32 statistics summed in another order can move the rounded
        # normed value by one ulp of the dtype, then times the weight.
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        assert ((out.float() - exp_out.float()).abs() <= 2 * ulp * exp_out.float().abs() + 1e-6).all()


@needs_triton
def test_rms_norm_kernel_float32_weight_promotes():
    x = torch.randn(2, 24).to(torch.bfloat16).to(DEVICE)
    w = torch.rand(24).to(DEVICE) + 0.5
    out, _ = _kernels().rms_norm(x, w, 1e-5)
    exp, _ = ref.rms_norm(x, w, 1e-5)
    assert out.dtype == exp.dtype == torch.float32
    torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)


@needs_triton
def test_kernels_reject_bad_input():
    k = _kernels()
    q, scale = ref.quantize_int8(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        k.int8_matmul(torch.randn(2, 7).to(DEVICE), q.to(DEVICE), scale.to(DEVICE))
    with pytest.raises(TypeError, match="float16"):
        k.int8_matmul(torch.ones(2, 8, dtype=torch.int32).to(DEVICE), q.to(DEVICE), scale.to(DEVICE))
    with pytest.raises(ValueError, match="scale"):
        k.int8_matmul(torch.randn(2, 8).to(DEVICE), q.to(DEVICE), scale.double().to(DEVICE))
    packed, s4, o4 = ref.quantize_int4(torch.randn(4, 8), 4)
    with pytest.raises(ValueError, match="group_size"):
        k.int4_matmul(torch.randn(1, 8).to(DEVICE), packed.to(DEVICE), s4.to(DEVICE), o4.to(DEVICE), 3)
    with pytest.raises(ValueError, match="residual"):
        k.rms_norm(torch.randn(2, 8).to(DEVICE), torch.ones(8).to(DEVICE), 1e-6, torch.randn(2, 7).to(DEVICE))


# ------------------------------------------------------------- compiled (GPU only)


@needs_cuda
def test_compiled_kernels_on_decode_and_prefill_shapes():
    """The real compiled kernels at model-like sizes (the interpreter covers edge shapes)."""
    k = _kernels()
    g = torch.Generator().manual_seed(6)
    w = torch.randn(1536, 576, generator=g) * 0.05
    q, scale = (t.cuda() for t in ref.quantize_int8(w))
    codes = [t.cuda() for t in ref.quantize_int4(w, 64)]
    for m in (1, 7, 128):
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(m, 576, generator=g).to(dtype).cuda()
            _close(k.int8_matmul(x, q, scale), ref.int8_matmul(x, q, scale), dtype)
            _close(k.int4_matmul(x, *codes, 64), ref.int4_matmul(x, *codes, 64), dtype)
    x = torch.randn(4, 2048).half().cuda()
    out, _ = k.rms_norm(x, torch.ones(2048).half().cuda(), 1e-6)
    _close(out, ref.rms_norm(x, torch.ones(2048).half().cuda(), 1e-6)[0], torch.float16)
