"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): quantize a linear weight column by column along K, spreading
each column's rounding error over the columns not yet quantized through the inverse Hessian of the layer input.

Follows the reference algorithm (IST-DASLab gptq.py; llm-compressor's ``gptq_quantize``):

- ``H = 2/n Σ x xᵀ`` over the n calibration tokens of the input, accumulated in fp32 (``HessianAccumulator``);
- dead inputs (``H_ii == 0``): ``H_ii = 1`` and ``W[:, i] = 0`` (no token ever uses them);
- dampening ``H += damp · mean(diag H) · I``; a failed Cholesky retries with a 10× larger damp (reported);
- the upper Cholesky factor of ``H⁻¹``; blocks of ``block_size`` columns, errors inside a block applied at once
  per column, to the columns after the block lazily (one matmul per block);
- a group's scale/zero is computed when the group's first column comes up, from the group's *current* weights
  (already updated by the errors of earlier columns);
- ``act_order``: columns go in descending ``diag(H)`` order, with **static groups**: every group's scale/zero is
  computed up front from the contiguous K-groups of the original order, so the codes stay in the plain group
  layout (no ``g_idx``, no permutation in the artifact).

The quantization grid is rtn.py's (``compute_qparams``; ``quantize`` / ``dequantize_codes`` written inline for one
column, the same fp32 operations), so the output is exactly RTN's layout: ``(q uint8 [K, N], scales fp32 [K/G, N],
zeros fp32 [K/G, N])`` for a weight ``[N, K]``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from teal_quant.compression.quantize.rtn import QuantSpec, compute_qparams

MAX_DAMP_RETRIES = 4  # damp, 10·damp, ... : beyond 10⁴·damp the Hessian carries no information worth using


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over the rows of every batch passed to ``update`` (fp32, one [K, K] matrix)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add the tokens of ``x`` [..., K]: a running mean, so the scale does not grow with the token count."""
        x = x.reshape(-1, self.hessian.shape[0]).to(self.hessian.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.hessian.mul_(self.count / (self.count + m))
        self.count += m
        x = x * math.sqrt(2.0 / self.count)
        self.hessian.addmm_(x.t(), x)


@dataclass
class GPTQStats:
    """What one GPTQ call did: the damp it finally used (larger than asked when Cholesky failed), the number of
    dead input columns, and the GPTQ objective Σ (w − q)² / [H⁻¹]_ii / 2 (the proxy loss of the paper)."""

    damp: float
    dead_columns: int
    loss: float


def _inverse_hessian_factor(hessian: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + d·mean(diag H)·I)⁻¹, retrying with d ×10 when a factorization fails."""
    mean_diag = float(torch.diagonal(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    d = damp
    for _ in range(MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(hessian + d * mean_diag * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, d
        d *= 10
    raise ValueError(f"the Hessian is not positive definite even with damp {d / 10:g} (asked {damp:g}): "
                     "the calibration inputs are degenerate")


def gptq_quantize(
    weight: Tensor,
    spec: QuantSpec,
    hessian: Tensor | None = None,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    stats: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of an nn.Linear weight [N, K] given its input Hessian [K, K] (``HessianAccumulator.hessian``).

    Returns (q uint8 [K, N], scales fp32 [K/G, N], zeros fp32 [K/G, N]), the layout of ``rtn_quantize``. Runs on
    the weight's device. ``stats``, when given, receives the fields of ``GPTQStats`` (as a dict).
    """
    if hessian is None:
        raise ValueError("gptq needs the input Hessian of the layer (pass hessian=)")
    if weight.dim() != 2:
        raise ValueError(f"expected a linear weight of shape [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if hessian.shape != (K, K):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({K}, {K}) for a weight {tuple(weight.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not 0 < damp < 1:
        raise ValueError(f"damp must be in (0, 1), got {damp}")
    G = spec.resolved_group_size(K)
    group_spec = QuantSpec(bits=spec.bits, group_size=-1, sym=spec.sym)   # qparams of one [G, N] slice
    qmax = spec.qmax

    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(W.device, torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scales = torch.empty(K // G, N, dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    if act_order:
        # static groups: from the original (dead-zeroed) weights, in the original order
        scales[:], zeros[:] = compute_qparams(W.t(), spec)
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = None
    order = perm.tolist() if perm is not None else range(K)  # original column index of position j

    Hinv, used_damp = _inverse_hessian_factor(H, damp)
    if used_damp != damp:
        warnings.warn(f"gptq: Cholesky failed with damp {damp:g}; used damp {used_damp:g}", RuntimeWarning, stacklevel=2)
    Q = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            k = order[j]
            if not act_order and k % G == 0:
                # the group's current weights: inside the block from W1, after it with this block's errors so far
                current = W1[:, i : min(i2 - i1, i + G)]
                if j + G > i2:
                    later = W[:, i2 : j + G] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2 : j + G]
                    current = torch.cat([current, later], dim=1)
                s, z = compute_qparams(current.t(), group_spec)
                scales[k // G], zeros[k // G] = s[0], z[0]
            w = W1[:, i]
            s, z = scales[k // G], zeros[k // G]
            # rtn.quantize and rtn.dequantize_codes of one column, inline (the same fp32 operations in the same order,
            # so the same bits): the codes stay float (integers in [0, qmax], exact) for the dequantization
            q = torch.round(w / s + z).clamp_(0, qmax)
            Q[:, j] = q
            w_hat = (q - z) * s
            d = Hinv1[i, i]
            err = (w - w_hat) / d
            loss += ((w - w_hat).double() ** 2).sum() / d.double() ** 2 / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if stats is not None:
        stats.update(GPTQStats(damp=used_damp, dead_columns=int(dead.sum()), loss=float(loss)).__dict__)
    return Q.t().contiguous(), scales, zeros
