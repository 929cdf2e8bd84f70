"""The same int4 weights through torch's tinygemm kernel (`torch._weight_int4pack_mm`, what gpt-fast and torchao's
int4 weight-only users run): the `tinygemm` baseline of `teal-quant bench`, in the same model and decoder.

tinygemm computes W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n] from its own tiled packing of the 4-bit codes.
Our W^T[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n], so the codes are the same and zero = scale * (8 - zeros)
(rounded to the model dtype: a difference of one rounding step in the offset). CUDA and bf16 only (the kernel's).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from teal_quant import kernels
from teal_quant.runtime.fusion import GROUPS, share_projections
from teal_quant.runtime.modules import TealLinear

INNER_K_TILES = 8


class TinyGemmLinear(nn.Module):
    """y = x @ W^T with W as tinygemm int4 (bf16 activations, group size 32 / 64 / 128 / 256)."""

    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, group_size: int, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.group_size, self.in_features, self.out_features = int(group_size), int(in_features), int(out_features)

    @classmethod
    def from_quantized(cls, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> TinyGemmLinear:
        """From teal-quant's packed int4 layout (qweight [K, N // 8], scales / zeros [K // G, N])."""
        codes = kernels.unpack(qweight, 4).t().contiguous()  # uint8 [N, K]
        n, k = codes.shape
        pairs = (codes[:, ::2] << 4) | codes[:, 1::2]  # two codes per byte, the first in the high nibble
        del codes
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), INNER_K_TILES)
        s32 = scales.float()
        zero = (s32 * (8.0 - zeros.float())).to(torch.bfloat16)
        scales_and_zeros = torch.stack([scales.to(torch.bfloat16), zero], dim=-1).contiguous()  # [K // G, N, 2]
        return cls(packed, scales_and_zeros, group_size, k, n)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size,
                                               self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def tinygemm_unsupported(model: nn.Module) -> str | None:
    """None when every TealLinear of the model can run through tinygemm, else why not."""
    for name, m in model.named_modules():
        if not isinstance(m, TealLinear):
            continue
        if m.qweight.device.type != "cuda":
            return "tinygemm (torch._weight_int4pack_mm) runs on CUDA only"
        if m.bits != 4 or m.group_size not in (32, 64, 128, 256):
            return f"{name}: tinygemm takes int4 weights in groups of 32, 64, 128 or 256"
        if m.in_features % (INNER_K_TILES * 16) or m.out_features % 8:
            return f"{name}: tinygemm needs K % {INNER_K_TILES * 16} == 0 and N % 8 == 0"
        if m.perm is not None or m.channel_scale is not None or m.bias is not None:
            return f"{name}: act-order, per-channel thresholds or a bias are not part of the tinygemm baseline"
    return None


def swap_to_tinygemm(model: nn.Module) -> Callable[[], None]:
    """Put a TinyGemmLinear in place of every TealLinear (q/k/v and gate/up as one product each, like the fused
    TealLinear groups); returns the function that puts the TealLinear modules back."""
    reason = tinygemm_unsupported(model)
    if reason is not None:
        raise ValueError(reason)
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for names in GROUPS:
            for n in names:
                if isinstance(getattr(parent, n, None), TealLinear):
                    saved.append((parent, n, getattr(parent, n)))

    def group(members: list[nn.Module]) -> nn.Module | None:
        if not all(isinstance(m, TealLinear) for m in members):
            return None
        with torch.no_grad():
            return TinyGemmLinear.from_quantized(torch.cat([m.qweight for m in members], 1),
                                                 torch.cat([m.scales for m in members], 1),
                                                 torch.cat([m.zeros for m in members], 1), members[0].group_size)

    share_projections(model, group)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TealLinear):
                saved.append((parent, name, child))
                with torch.no_grad():
                    setattr(parent, name, TinyGemmLinear.from_quantized(child.qweight, child.scales, child.zeros,
                                                                        child.group_size))

    def restore() -> None:
        for parent, name, module in saved:
            setattr(parent, name, module)

    return restore
