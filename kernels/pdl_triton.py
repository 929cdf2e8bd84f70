"""Programmatic dependent launch (PDL) for every Triton kernel family: the jit prologue each kernel runs first and the
launch options that turn it on (kernels/dispatch.py decides per device and family, from the GPU's table).

A kernel launched with PDL may start while the previous kernel on the stream is still running. Its programs first wait
(griddepcontrol.wait: the previous kernel has ended and its writes are visible; every earlier kernel had ended before
that one could), then let the next kernel launch (griddepcontrol.launch_dependents), and only then read or write
memory. So nothing changes in what a kernel sees, only the launch latency and the previous kernel's drain overlap.
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
def wait_previous_kernel(PDL: tl.constexpr):
    """The first statement of every kernel: with PDL, wait for the previous kernel, then release the next one."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def launch_options(device: torch.device, family: str) -> dict:
    """Keyword arguments of a launch: ``PDL`` (the kernel's constexpr) and triton's ``launch_pdl``, or none."""
    if gdc_wait is None or not programmatic_launch(device, family):
        return {}
    return {"PDL": True, "launch_pdl": True}
