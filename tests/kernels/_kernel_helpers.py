"""Random quantized layers and float64 truth for the kernel tests."""

import torch
from teal_quant.kernels import reference

ON_GPU = torch.cuda.is_available()


def make_layer(k, n, group_size, bits, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    qmax = 15 if bits == 4 else 255
    q = torch.randint(0, qmax + 1, (k, n), generator=g, dtype=torch.uint8)
    scales = (torch.rand(k // group_size, n, generator=g) * 0.02 + 0.002).to(dtype)
    zeros = torch.randint(0, qmax + 1, (k // group_size, n), generator=g).to(dtype)
    qweight = reference.pack(q, bits)
    return q, qweight.to(device), scales.to(device), zeros.to(device)


def truth(x, q, scales, zeros, group_size, threshold):
    """float64 (x * (|x| > t)) @ W^T, NaN inputs treated as inactive."""
    x64 = x.double().cpu()
    if isinstance(threshold, torch.Tensor):
        t = threshold.double().cpu()
    else:
        t = float(threshold)
    xm = torch.where(x64.abs() > t, x64, torch.zeros((), dtype=torch.float64))
    s = scales.double().cpu().repeat_interleave(group_size, 0)
    z = zeros.double().cpu().repeat_interleave(group_size, 0)
    return xm @ ((q.double() - z) * s)


def threshold_for(x, sparsity):
    """A scalar threshold that zeroes about ``sparsity`` of |x| (sparsity 1.0: everything)."""
    if sparsity >= 1.0:
        return float("inf")
    if sparsity <= 0.0:
        return 0.0
    return torch.quantile(x.float().abs().flatten().cpu(), sparsity).item()


def tol(dtype, scale):
    """Output rounding of fp16 / bf16 (a few ulps of the largest output) plus fp32 accumulation noise."""
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-20}[dtype]
    return 4 * eps * max(scale, 1e-3)
