"""Programmatic dependent launch (PDL) for every Triton kernel family: the jit prologue each kernel runs first and the
launch options that turn it on (kernels/dispatch.py decides per device and family, from the GPU's table).

A kernel launched with PDL may start while the previous kernel on the stream is still running. Until its programs
have waited (griddepcontrol.wait: the previous kernel has ended and its writes are visible; every earlier kernel had
ended before that one could) they read only the call's parameters (weights, scales, norm weights; mode 2) or nothing
(mode 1); the decode attention also reads, in mode 2, what no kernel of the running step writes before it (the
position, advanced at the end of the previous step; the rotary tables; the cached keys and values of earlier
positions): data the kernel it may overlap cannot be writing. Then they let the next kernel launch (griddepcontrol.launch_dependents; after the wait, so at most two
kernels share the GPU) and go on. So nothing changes in what a kernel sees: only the launch latency, the parameter
loads and the previous kernel's drain overlap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import programmatic_launch

try:  # triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older triton: PDL never requested (see launch_options)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def wait_previous_kernel(WAIT: tl.constexpr):
    """With ``WAIT`` (a kernel's ``PDL > 0`` at its top; ``PDL == 1`` / ``PDL == 2`` before / after a parameter
    prologue): wait for the previous kernel, then release the next one."""
    if WAIT:
        gdc_wait()
        gdc_launch_dependents()


def launch_options(device: torch.device, family: str) -> dict:
    """Keyword arguments of a launch: ``PDL`` (the kernel's constexpr mode) and triton's ``launch_pdl``, or none."""
    mode = programmatic_launch(device, family) if gdc_wait is not None else 0
    return {"PDL": mode, "launch_pdl": True} if mode else {}
