"""Kernel tests run on the GPU when there is one, else on the CPU through the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported; kernels/ imports triton lazily, so setting it here (at
collection, before any test imports the kernel modules) is enough.
"""

import dataclasses
import inspect
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if ON_GPU else "cpu"


def _interpreter_without_overflow_sanitizer() -> None:
    """The interpreter's options have debug off, so tl.device_assert is dropped, but with sanitize_overflow on (its
    default) every int32 add/sub/mul is first redone in int64 and range-compared for the assert it then drops: a
    fifth to a third of the interpreted kernels' CPU time for no check. Off, every test computes the same values."""
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or getattr(options, "debug", True) or not getattr(options, "sanitize_overflow", False):
        return  # another triton, or asserts really on: leave it as it is
    builder.options = dataclasses.replace(options, sanitize_overflow=False)


def _interpreter_patching_builtins_by_name() -> None:
    """Every launch, and every @triton.jit helper called inside one, re-patches triton.language's builtins, finding
    them with inspect.getmembers over each whole namespace (a quarter of the interpreted kernels' CPU time). The
    builtins' names are the same each time: list them once, and patch whatever of them is a builtin then, exactly
    the members inspect.getmembers would have given (in the same order)."""
    try:
        import triton.language as tl
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_builtin", None)
    is_builtin = getattr(getattr(tl, "core", None), "is_builtin", None)
    if original is None or not hasattr(interpreter, "_patch_attr") or is_builtin is None or hasattr(original, "names"):
        return  # another triton, or already done
    names: dict[object, list[str]] = {}

    def patch_builtin(pkg, builder, scope) -> None:
        if pkg not in names:  # the first call of a namespace, before anything patched it
            names[pkg] = [name for name, member in inspect.getmembers(pkg) if is_builtin(member)]
        for name in names[pkg]:
            member = getattr(pkg, name)
            if is_builtin(member):  # not one an enclosing launch has patched already
                interpreter._patch_attr(pkg, name, member, builder, scope)

    patch_builtin.names = names
    interpreter._patch_builtin = patch_builtin


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_without_overflow_sanitizer()
    _interpreter_patching_builtins_by_name()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the Triton launchers allocate comes back filled with garbage (NaN / huge ints)."""
    pytest.importorskip("triton")
    from teal_quant.kernels import gemv_common

    real = torch.empty

    def garbage_empty(*shape, dtype=torch.float32, device=None):
        t = real(*shape, dtype=dtype, device=device)
        if dtype.is_floating_point:
            t.fill_(float("nan"))
        else:
            t.fill_(0x3FFF_FFFF if dtype == torch.int32 else -1)
        return t

    monkeypatch.setattr(gemv_common, "_empty", garbage_empty)
    return garbage_empty
