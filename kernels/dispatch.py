"""Which backend and which kernel run a call, in one place.

* :func:`use_triton`: CUDA tensors -> the Triton kernels; CPU tensors -> the Triton kernels under the interpreter when
  ``TRITON_INTERPRET=1`` is set and triton imports, else the pure-torch reference (:mod:`.reference`).
* :func:`pick_gemv`: the sparse-GEMV kernel family and its launch shape, looked up in a per-GPU table kept as data
  (``kernels/configs/<gpu>.json``, written by ``benchmarks/gemv_sweep.py`` from measurements; docs/kernels.md).
  A table is a list of rules, first match wins; a rule matches a call by batch size ``m``, weight size ``n * k``
  (elements) and, optionally, ``bits`` and ``n``; its ``shape`` names the kernel (``core``: the CUDA-core batch-1
  kernel, kernels/gemv_triton.py; ``mma``: the tensor-core kernel, kernels/gemv_mma_triton.py; ``splitk``: the
  dense-tile tensor-core split-K kernel, kernels/gemv_splitk_triton.py) and its launch parameters
  (:class:`CoreShape`, :class:`MmaShape`, :class:`SplitKShape`). A rule whose shape cannot take the call (``core``
  at m > 4, a K-range or K-step that does not divide the group) is skipped. A rule with ``"dense_threshold": true``
  matches only calls whose threshold is a python number <= 0 (a quantized lm_head passes 0.0; dense levels): every
  nonzero input is active, so such rules name an always-dense shape (``CoreShape.dense`` 100: no compaction); rules
  without the key match any threshold.
* :func:`programmatic_launch`: in which mode (0 off) a kernel family launches with programmatic dependent launch
  (PDL, sm_90+) on a device: the table's ``pdl`` entry (``{family: mode}``, the mix measured fastest in the decode
  step by ``benchmarks/decode_pdl.py``) unless :func:`set_programmatic_launch` overrides it.
* :func:`pick_attention`: the launch choices of the decode attention kernel (:class:`AttentionShape`), the table's
  ``attention`` entry (measured by ``benchmarks/decode_attention.py``) unless :func:`set_attention_shape` overrides it.

Imports only torch (no triton, no device work at import).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CORE_MAX_M = 4  # the CUDA-core kernel keeps M x 8 accumulators per word: beyond 4 rows it spills


def triton_available() -> bool:
    """True when triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: Tensor) -> bool:
    """All device/backend dispatch lives here."""
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and interpreting() and triton_available()


@dataclass(frozen=True)
class CoreShape:
    """Launch shape of the CUDA-core kernel (kernels/gemv_triton.py; M <= CORE_MAX_M = 4, made for M = 1; ``h2``
    also at M = 2..4)."""

    vec: int  # int32 words per thread per row (1, 2, 4): a program owns 32 * vec * (32 // bits) columns
    warps: int  # warps of a program; they split the active rows of its K-range
    rows: int  # rows per warp per step, unrolled: their loads are in flight together
    k_range: int  # rows of W^T per program (divides the group size)
    f16: bool = True  # int4: unpack through fp16 pairs (else the fp32 exponent trick)
    pipe: bool = False  # rows == 4 (any rows with loads_first): the next step's row indices and x are loaded before
    # this step's FMAs
    evict_first: bool = False  # weight loads marked evict-first (the scratch lists and x stay in the L2)
    maxnreg: int = 0  # register cap per thread (0: ptxas decides)
    stages: int = 1  # > 1 (not with pipe): the row loop is software-pipelined by triton, its loads cp.async copies
    # into a shared-memory ring stages - 1 steps ahead (R * warps rows x 128 * vec bytes per stage)
    groups: int = 1  # K-ranges per program (> 1: not with pipe; k_range a multiple of warps * rows): one row loop
    # over all of them, scales applied per warp when it leaves a K-range; fewer, longer programs (and with stages > 1
    # one ring kept filled across the K-ranges)
    dense: int = 0  # percent, 1-100 (not with pipe, stages or groups; k_range a multiple of warps * rows): a K-range
    # with at least this share of active rows is not compacted but read in place, inactive rows predicated off (no
    # scratch round trip; the loop issues every row's instructions); 100: always in place (no compaction compiled);
    # 0: always compacted
    h2: bool = False  # int4, batch 1-4 (CORE_MAX_M), fp16/bf16 x (any loop): the products are summed in fp16 pairs
    # (HFMA2; x scaled into [8, 16) by a power of two per program and batch row, the pairs converted to fp32 once per
    # K-range): 13 instead of 21 instructions per word at batch 1; at batch 2-4 the unpack (1 SHF + 4 LOP3 + 4 HSUB2)
    # is shared by the rows, 4 HFMA2 per row, x paired before the loop (scratch list) and, in place, every row read
    # unpredicated; int8 and fp32 x take the fp16-pair unpack into fp32 (int4) or the integer unpack
    preload: int = 0  # 1 or 2 (not with pipe, stages or groups; k_range a multiple of warps; implies dense 100):
    # every row of the program's K-range is loaded at its start, all loads in flight together (k_range / warps
    # row loads of 4 * vec bytes per thread, held in registers; rows ignored). 1: before x is read, inactive rows
    # too (x = 0): no load waits for anything; 2 (batch 1; at batch 2-4 as 1): after x, inactive rows predicated
    # off (no traffic). For small layers, whose time is one program's chain of dependent round trips (round 10)
    lookahead: int = 0  # with preload: 0 (round 10): every FMA waits for every preloaded row; L > 0 (round 11): the
    # FMAs of a warp's row r wait for its own load and for that of its row r + L (none past the last row; L >=
    # k_range / warps: its own only), so they may start while later rows are in flight (ptxas still issues the loads
    # first in the measured shapes: benchmarks/profile/sass_core.py; it groups them on 3-4 scoreboards)
    loads_first: bool = False  # round 12: every row loop (compacted, pipe, in place) writes all R rows' loads of a
    # step before their FMAs at any R (without it only R = 4 does, in the h2 compacted loop and the in-place loop;
    # at R = 8 ptxas then spreads the row loads over the step, one slot -> row round trip after another: SASS), so
    # R rows per warp are in flight together: fewer dependent steps per program (made for the 0.5-1-wave layers)
    shfl: bool = False  # stop 28, batch 1 on CUDA (elsewhere ignored): the compacted list in registers, one slot per
    # lane (a ballot per 32 rows, the n-th set bit), each step's rows and x broadcast by warp shuffles: no scratch
    # stores, barrier or slot loads (L2 round trips) before the row loads. Compacting loops that read slots a step at a
    # time (pipe, loads_first, or h2 with rows 4); k_range a multiple of 32, at most 128 and 32 * warps; not with
    # groups, stages or preload
    kernel = "core"


@dataclass(frozen=True)
class MmaShape:
    """Launch shape of the tensor-core kernel (kernels/gemv_mma_triton.py; any M <= 16)."""

    block_n: int = 256  # columns per column tile (multiple of 8; a power of two)
    block_k: int = 32  # compacted rows per tl.dot step (>= 16)
    warps: int = 4
    k_range: int = 128  # rows of W^T per program (divides the group size)
    stages: int = 1  # num_stages of the row loop (software pipelining by triton)
    maxnreg: int = 0  # register cap per thread (0: ptxas decides)
    swap: bool = False  # y^T = W x^T: the weight tile is the dot's M side, the batch (padded to 8) its N side
    tiles: int = 1  # column tiles per program: the compaction of a K-range is shared by all of them
    kernel = "mma"


@dataclass(frozen=True)
class SplitKShape:
    """Launch shape of the dense-tile split-K kernel (kernels/gemv_splitk_triton.py; any M <= 16, made for M >= 4):
    no compaction, contiguous [block_k, block_n] weight tiles streamed by triton's software pipeliner."""

    block_n: int = 128  # columns per program (a power of two >= 16)
    block_k: int = 128  # rows of W^T per tl.dot step (a power of two >= 16 dividing the group size)
    warps: int = 4
    stages: int = 4  # num_stages of the K loop (cp.async ring of stages - 1 weight tiles ahead)
    programs: int = 528  # wanted programs per call: the K split is chosen per call to come near it (4 x 132 SMs)
    swap: bool = True  # y^T = W x^T: the weight tile is the dot's M side, the batch (padded to 8) its N side
    skip: bool = False  # a K-step whose x values are all inactive (every batch row) loads no weights (its mask
    # depends on x loaded in the same loop: triton 3.6 then keeps the weight ring 1 deep at stages 4, 2 at 6)
    prefetch: bool = True  # the next K-step's scales / zeros are loaded during this one (a plain load: too narrow
    # per thread for the pipeliner's cp.async)
    maxnreg: int = 0  # register cap per thread (0: ptxas decides)
    sum_dot: bool = False  # 16-bit x: each K-step's sum of x (the zero point's term) as a second tl.dot of a ones
    # tile, which lands in the accumulator's layout, instead of a cross-thread reduction (shuffles, shared memory,
    # barriers) per K-step (round 13)
    kernel = "splitk"


GemvShape = CoreShape | MmaShape | SplitKShape


@dataclass(frozen=True)
class AttentionShape:
    """Launch choices of the decode attention kernel (kernels/attention_triton.py; docs/kernels.md "Decode attention
    at short context"). The defaults are the H200's measured best (benchmarks/results/decode_attention_h200.md);
    ``registers=False, wide=False`` is the kernel before issue 13's short-context round."""

    block_n: int = 64  # keys per block at head size <= 128 (a power of two >= 16; halved per doubling of the head size)
    split_factor: float = 2.0  # working splits per sqrt(key blocks) at the current position (> 0)
    registers: bool = True  # the new token's score and value taken from registers, the cached keys (positions < pos)
    # and the rotary row loaded first (before the PDL wait in mode 2); False: the new key and value written to the
    # cache, a barrier, then read back with their block
    wide: bool = True  # the split combination loads every split's partial results at once (chunks of 8 splits);
    # False: loops of dependent loads, one split after another
    warps: int = 4
    stages: int = 2  # num_stages of the key-block loop


def shape_from_dict(d: dict) -> GemvShape:
    d = dict(d)
    kind = d.pop("kernel")
    cls = {"core": CoreShape, "mma": MmaShape, "splitk": SplitKShape}[kind]
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {kind} launch parameters {sorted(unknown)}")
    return cls(**d)


def shape_to_dict(shape: GemvShape, defaults: bool = True) -> dict:
    """``{"kernel": ..., launch parameters}``; defaults False leaves out the parameters at their default."""
    d = asdict(shape)
    if not defaults:
        d = {f.name: d[f.name] for f in fields(shape) if d[f.name] != f.default}
    return {"kernel": shape.kernel, **d}


def table_name(device: torch.device) -> str:
    """The table a device reads: ``interpreter`` on the CPU, ``h200`` for an H200, else ``default``."""
    if device.type != "cuda":
        return "interpreter"
    name = torch.cuda.get_device_name(device).lower()
    for key in sorted((p.stem for p in CONFIG_DIR.glob("*.json")), key=len, reverse=True):
        if key not in ("default", "interpreter") and key in name.replace(" ", "").replace("-", ""):
            return key
    return "default"


def _read_table(name: str) -> dict:
    with open(CONFIG_DIR / f"{name}.json") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def load_table(name: str) -> tuple[dict, ...]:
    """The rules of ``configs/<name>.json`` (each with a parsed ``shape``), in order."""
    return tuple({**rule, "shape": shape_from_dict(rule["shape"])} for rule in _read_table(name)["rules"])


# -- programmatic dependent launch --------------------------------------------------------------------------------------
# With PDL a kernel is launched while the previous one on the stream still runs: its programs read only the call's
# parameters (weights, scales, norm weights: never activations or buffers; the decode attention also the position
# and the cached keys of earlier positions, written before the step) until griddepcontrol.wait returns (the
# previous kernel has ended and its writes are visible; every earlier kernel had ended before that one could), then
# let the next kernel launch (griddepcontrol.launch_dependents). So launch latency, parameter loads and the previous
# kernel's drain overlap across a decode step's chain of small kernels, CUDA graphs included. Families: the kernel
# files (gemv_*: "gemv", elementwise_triton: "elementwise", attention_triton: "attention", counters_triton:
# "counters"). Mode per family: 0 off; 1 wait first; 2 parameters first, then wait (kernels without a parameter
# prologue wait first).
PDL_FAMILIES = ("gemv", "elementwise", "attention", "counters")
PDL_MODES = (0, 1, 2)
_pdl_override: dict[str, int] | None = None


def set_programmatic_launch(modes: dict[str, int] | None = None) -> None:
    """Launch kernel families with PDL in these modes from now on (``{family: mode}``, families of
    :data:`PDL_FAMILIES`, absent ones off); None: back to the device table's choice. Read at launch: CUDA graphs keep
    what they were captured with."""
    global _pdl_override
    if modes is None:
        _pdl_override = None
        return
    modes = dict(modes)
    unknown = set(modes) - set(PDL_FAMILIES)
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}; known: {', '.join(PDL_FAMILIES)}")
    if any(m not in PDL_MODES for m in modes.values()):
        raise ValueError(f"PDL modes are {PDL_MODES}, got {modes}")
    _pdl_override = modes


@functools.lru_cache(maxsize=None)
def _table_pdl(index: int) -> dict[str, int]:
    device = torch.device("cuda", index)
    if torch.cuda.get_device_capability(device)[0] < 9:  # griddepcontrol is sm_90+
        return {}
    return dict(_read_table(table_name(device)).get("pdl", {}))


def programmatic_launch(device: torch.device, family: str) -> int:
    """The PDL mode (0 off) of kernels of ``family`` on ``device`` (always 0 on the CPU or under the interpreter)."""
    if device.type != "cuda" or interpreting():
        return 0
    if _pdl_override is not None:
        return _pdl_override.get(family, 0) if torch.cuda.get_device_capability(device)[0] >= 9 else 0
    return _table_pdl(device.index if device.index is not None else torch.cuda.current_device()).get(family, 0)


# -- decode attention -------------------------------------------------------------------------------------------------
_attention_override: AttentionShape | None = None


def set_attention_shape(shape: AttentionShape | None = None) -> None:
    """Launch the decode attention kernel with this shape from now on; None: back to the device table's. Read at
    launch and by the workspace sizing: allocate the workspace after setting it; CUDA graphs keep what they captured."""
    global _attention_override
    _attention_override = shape


def attention_shape_from_dict(d: dict) -> AttentionShape:
    unknown = set(d) - {f.name for f in fields(AttentionShape)}
    if unknown:
        raise ValueError(f"unknown attention launch parameters {sorted(unknown)}")
    shape = AttentionShape(**d)
    if shape.block_n < 16 or shape.block_n & (shape.block_n - 1) or not shape.split_factor > 0:
        raise ValueError(f"attention launch shape out of range: {shape}")
    return shape


@functools.lru_cache(maxsize=None)
def _table_attention(name: str) -> AttentionShape:
    return attention_shape_from_dict(_read_table(name).get("attention", {}))


def pick_attention(device: torch.device) -> AttentionShape:
    """The decode attention launch shape on ``device``: the override, else the table's ``attention`` entry, else the
    defaults."""
    if _attention_override is not None:
        return _attention_override
    return _table_attention(table_name(device))


def _in(value: int, bounds) -> bool:
    return bounds is None or bounds[0] <= value <= bounds[1]


def fits(shape: GemvShape, m: int, k: int, bits: int, group_size: int) -> bool:
    """Whether a launch shape can take the call at all (not whether it is fast). The core kernel takes m <= CORE_MAX_M
    (4) with every option, ``h2`` included (one power of two per batch row); ``h2`` is used for int4 weights with
    fp16/bf16 x and ignored otherwise (int8, fp32 x: the same shape without it), so it never makes a shape unfit."""
    if isinstance(shape, SplitKShape):
        bk = shape.block_k
        return 16 <= bk and group_size % bk == 0 and shape.block_n >= 16 and shape.block_n & (shape.block_n - 1) == 0
    kr = shape.k_range
    if kr < 16 or group_size % kr or k % kr:
        return False
    if isinstance(shape, CoreShape):
        if shape.groups > 1 and (shape.pipe or k % (kr * shape.groups) or kr % (shape.warps * shape.rows)):
            return False
        if shape.dense and (shape.pipe or shape.stages > 1 or shape.groups > 1 or kr % (shape.warps * shape.rows)
                            or not 0 < shape.dense <= 100):
            return False
        if shape.preload and (shape.pipe or shape.stages > 1 or shape.groups > 1 or kr % shape.warps
                              or shape.preload not in (1, 2)):
            return False
        if shape.lookahead and (not shape.preload or shape.lookahead < 0):
            return False
        if shape.shfl and (shape.groups > 1 or shape.stages > 1 or shape.preload or shape.dense == 100 or kr % 32
                           or kr > min(128, 32 * shape.warps)
                           or not (shape.pipe or shape.loads_first or (shape.h2 and shape.rows == 4))):
            return False
        return (m <= CORE_MAX_M and (not shape.pipe or shape.rows == 4 or shape.loads_first)
                and (shape.stages == 1 or not shape.pipe))
    return shape.block_k <= kr and shape.block_n % 8 == 0


def fit_k_range(shape: GemvShape, group_size: int, k: int | None = None) -> GemvShape:
    """The shape with its K-range (split-K: its K-step) halved until it divides the group size (a table is written
    for group 128), and (core, given K) its K-ranges per program halved until their span divides K."""
    if isinstance(shape, SplitKShape):
        bk = shape.block_k
        while bk > 16 and group_size % bk:
            bk //= 2
        return shape if bk == shape.block_k else SplitKShape(**{**asdict(shape), "block_k": bk})
    kr = shape.k_range
    while kr > 16 and group_size % kr:
        kr //= 2
    changes = {"k_range": kr} if kr != shape.k_range else {}
    if isinstance(shape, MmaShape) and shape.block_k > kr:
        changes["block_k"] = kr
    if isinstance(shape, CoreShape) and k is not None:
        groups = shape.groups
        while groups > 1 and k % (kr * groups):
            groups //= 2
        if groups != shape.groups:
            changes["groups"] = groups
    if not changes:
        return shape
    return type(shape)(**{**asdict(shape), **changes})


def dense_threshold(threshold) -> bool:
    """Whether a call's threshold keeps every nonzero input: a python number <= 0 (not a tensor, whose value the host
    does not read)."""
    return isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold <= 0


def pick_gemv(m: int, n: int, k: int, bits: int, group_size: int, device: torch.device, table: str | None = None,
              threshold: float | Tensor | None = None) -> GemvShape | None:
    """The first rule of the device's table that matches and fits; None when none does (group sizes below 16: the
    caller uses the reference). ``threshold``: the call's threshold (a python number or a tensor), for the rules
    keyed ``dense_threshold``."""
    dense = dense_threshold(threshold)
    for rule in load_table(table or table_name(device)):
        if not (_in(m, rule.get("m")) and _in(n * k, rule.get("weight")) and _in(n, rule.get("n"))):
            continue
        if "bits" in rule and bits != rule["bits"]:
            continue
        if rule.get("dense_threshold", False) and not dense:
            continue
        shape = fit_k_range(rule["shape"], group_size, k)
        if fits(shape, m, k, bits, group_size):
            return shape
    return None
