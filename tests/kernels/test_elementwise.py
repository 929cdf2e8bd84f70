"""kernels.rms_norm / silu_mul / rotary: the one-launch twins of transformers' Llama RMSNorm, SiLU-and-mul, rotary.

Each kernel is checked against the eager transformers computation (kernels.reference, which is that code) and, in
fp32, against the definition computed in float64. Tolerances, in units of the output dtype's rounding step
(eps = 2^-23 fp32, 2^-10 fp16, 2^-7 bf16) relative to the output's magnitude:
- fp32: 4 eps of the float64 value (rsqrt approximation and summation order); SiLU 16 eps (a GPU's approximate
  exp and division: the H200 measured up to ~8);
- fp16 / bf16 against the eager code: 2 rounding steps. The kernels round where the eager code rounds, so on a GPU
  they agree to within one step; the Triton interpreter (CPU CI) truncates instead of rounding when it casts to
  bf16, which can add one more.
"""

import math

import pytest
import torch
from teal_quant.kernels import reference

from teal_quant import kernels

pytest.importorskip("triton")

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close_steps(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, steps: float, scale=None):
    """|got - want| <= steps * eps(dtype) * scale, scale = |want| (or the given magnitude, e.g. of the terms of a
    sum that can cancel), floored at 1e-3."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.double(), want.double()
    tol = steps * EPS[dtype] * (w.abs() if scale is None else scale.double()).clamp(min=1e-3)
    bad = (g - w).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} beyond {steps} steps; worst {float((g - w).abs().max()):.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [576, 1000])  # SmolLM2's hidden size; a size that is not a multiple of the block
def test_rms_norm_matches_transformers(device, dtype, n):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(3, 2, n, generator=g) * 3).to(dtype).to(device)
    norm = LlamaRMSNorm(n, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=g))
        want = norm(x)
    got = kernels.rms_norm(x, norm.weight, 1e-5)
    assert_close_steps(got, want, dtype, 4 if dtype == torch.float32 else 2)
    if dtype == torch.float32:  # the definition in float64
        x64 = x.double()
        exact = norm.weight.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
        assert_close_steps(got.double(), exact, torch.float32, 4)


def test_rms_norm_strided_rows_and_weight_promotion(device):
    """A column slice (row stride != N) reads correctly; an fp32 weight on bf16 activations gives fp32 like eager."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 1024, generator=g).to(torch.bfloat16).to(device)
    x = base[:, 256:832]  # [4, 576], row stride 1024
    w = torch.randn(576, generator=g).to(device)
    got, want = kernels.rms_norm(x, w, 1e-6), reference.rms_norm_ref(x, w, 1e-6)
    assert got.dtype == torch.float32
    assert_close_steps(got, want, torch.bfloat16, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_on_fused_gate_up_slices(device, dtype):
    """gate and up as column slices of one fused [M, 2I] output (how a fused gate/up group hands them out)."""
    g = torch.Generator().manual_seed(2)
    inter = 1536 + 40  # not a multiple of the block
    fused = (torch.randn(1, 3, 2 * inter, generator=g) * 4).to(dtype).to(device)
    gate, up = fused.split(inter, dim=-1)
    got, want = kernels.silu_mul(gate, up), torch.nn.functional.silu(gate) * up
    assert got.shape == (1, 3, inter)
    assert_close_steps(got, want, dtype, 16 if dtype == torch.float32 else 2)
    if dtype == torch.float32:
        g64, u64 = gate.double(), up.double()
        assert_close_steps(got.double(), g64 / (1 + torch.exp(-g64)) * u64, torch.float32, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,cos_batch", [(1, 1, 1), (2, 5, 2), (2, 3, 1)])
def test_rotary_matches_transformers(device, dtype, batch, seq, cos_batch):
    """q/k as the Llama attention makes them ([B, S, H, D] memory viewed as [B, H, S, D]), GQA head counts."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(batch * 10 + seq)
    d, hq, hk = 64, 6, 2
    q = torch.randn(batch, seq, hq, d, generator=g).to(dtype).to(device).transpose(1, 2)
    k = torch.randn(batch, seq, hk, d, generator=g).to(dtype).to(device).transpose(1, 2)
    angle = torch.rand(cos_batch, seq, d // 2, generator=g) * 100
    angle = torch.cat([angle, angle], dim=-1)
    cos, sin = angle.cos().to(dtype).to(device), angle.sin().to(dtype).to(device)
    if cos_batch != batch:
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)  # stride 0 over the batch
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = kernels.rotary(q, k, cos, sin)
    assert got_q.stride() == torch.empty_like(q).stride()
    c64, s64 = cos.double().unsqueeze(1), sin.double().unsqueeze(1)

    def terms(x):  # the output is a sum of two products that can cancel: tolerances scale with the products
        x64 = x.double()
        rot = torch.cat([-x64[..., d // 2:], x64[..., : d // 2]], dim=-1)
        return x64 * c64, rot * s64

    for got, want, x in ((got_q, want_q, q), (got_k, want_k, k)):
        a, b = terms(x)
        assert_close_steps(got, want, dtype, 2, scale=a.abs() + b.abs())
        if dtype == torch.float32:
            assert_close_steps(got.double(), a + b, torch.float32, 4, scale=a.abs() + b.abs())


def test_empty_inputs(device):
    x = torch.empty(0, 64, device=device)
    assert kernels.rms_norm(x, torch.ones(64, device=device), 1e-6).shape == (0, 64)
    assert kernels.silu_mul(x, x).shape == (0, 64)
    assert not math.isnan(float(kernels.rms_norm(torch.zeros(1, 64, device=device), torch.ones(64, device=device), 1e-6).sum()))
