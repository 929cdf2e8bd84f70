"""Which backend runs a kernel call: the one switch that the package's entry points (``__init__``) and its custom
ops (``ops``) share, in a module of its own so that neither imports the other for it.

CUDA tensors -> the Triton kernels; CPU tensors -> the Triton kernels under the interpreter when
``TRITON_INTERPRET=1`` is set and triton imports, else the pure-torch reference (:mod:`.reference`).
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor


def triton_available() -> bool:
    """True when triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(x: Tensor) -> bool:
    """All device/backend dispatch lives here."""
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and triton_available()
