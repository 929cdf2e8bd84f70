"""Which device and dtype a run uses: one rule for the pipeline, the runtime, synthetic models and benchmarks."""

from __future__ import annotations

import torch

from teal_quant.errors import TealQuantError

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def select_device(name: str | torch.device | None = None, *, option: str = "device") -> torch.device:
    """None or 'auto' -> CUDA when available, else the CPU; 'cuda' without a GPU is one clear error naming `option`."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TealQuantError(f"{option}: '{name}' is not a device (cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise TealQuantError(f"{option}: '{name}' is not supported (cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TealQuantError(f"{option}: cuda requested but no CUDA device is available")
    return device


def resolve_dtype(name: str, config_dtype: torch.dtype | str | None) -> torch.dtype:
    """'auto' -> the checkpoint's own floating dtype (float32 when it has none); otherwise the named dtype."""
    if name != "auto":
        return _DTYPES[name]
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype)
    return config_dtype if config_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
