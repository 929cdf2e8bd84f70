"""`teal-quant bench`: decode speed of an artifact (or of a synthetic architecture) against dense int4 and bf16.

One harness for every variant, in one process, on one model:
  ours  the TealLinear model at the sparsity level;
  int4  the very same model at level 0 (every weight row read: dense int4);
  tinygemm  the same int4 weights through torch._weight_int4pack_mm (gpt-fast's / torchao's int4 kernel), in
        the same decoder (CUDA only);
  bf16  the same model with every TealLinear replaced in place by an nn.Linear holding its dequantized weights
        (for an artifact its real weights, for an ARCH the synthetic random ones). When that dense model does not
        fit in GPU memory (70B: 141 GB), it is measured at two reduced depths of the real layer shape and every
        number is extrapolated linearly in the layer count (t(L) = a + b * L); the result says so.
Per variant and batch size (`--batch 1,4,16`), with the pinned `teal_quant.runtime.decoding.Decoder`:
  1. an eager decoder warms the kernels, measures the realized sparsity of every TealLinear (its counters) over a
     few steps, then runs a few steps with the counters off (as timed) under torch.profiler: kernel time grouped by
     name into linear / attention / norm+rotary / other;
  2. a fresh decoder (CUDA graphs on CUDA) times the prefill, warms up, then times `new_tokens` decode steps
     between two CUDA events (perf_counter on the CPU): ms per step, tokens/s = batch * 1000 / ms;
  3. bytes of weights one decode step reads (ours: only the surviving rows of W^T at the realized sparsity, plus
     every scale/zero, lm_head and the norms; the embedding reads one row and is not counted), and bytes / time.
Peak GPU memory is torch.cuda.max_memory_allocated over the variant. Results: a rich table and a JSON dict.

Tensor parallel (`--tp N` under `torchrun --nproc-per-node N`): every rank builds or loads the same model and keeps its
shard (teal_quant/runtime/tensor_parallel.py); all ranks run the same steps in lock-step (the all-reduces after o and
down synchronize them) and rank 0 reports. Bytes, bandwidth and peak memory are per rank (one GPU's share); the
breakdown has an all-reduce group (NCCL kernels on CUDA, the gloo all-reduce operator on the CPU). A variant that
fails under --tp ends the run (the other ranks would wait in an all-reduce it never reaches).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from teal_quant.compression.synthetic import SyntheticSpec
from teal_quant.devices import select_device
from teal_quant.errors import TealQuantError, first_line
from teal_quant.runtime.fusion import fuse_linear_projections, unfuse_projections
from teal_quant.runtime.modules import QuantLinear, reset_stats, teal_linears

BASELINES = ("bf16", "int4", "tinygemm")
CPU_BASELINES = ("bf16", "int4")  # the default on the CPU (tinygemm is a CUDA kernel)
# Kernel name -> group, first match wins (attention first: FlashAttention/cutlass fmha names contain "cutlass").
ATTENTION_KERNELS = ("flash", "fmha", "attention", "attn", "softmax")
LINEAR_KERNELS = ("gemv", "gemm", "matmul", "xmma", "cutlass", "nvjet", "splitk", "_compact_kernel", "_dequantize_kernel", "cublas")
NORM_ROTARY_KERNELS = ("rms_norm", "layer_norm", "layernorm", "rotary")
# CPU: TealLinear's decode row is aten::hardshrink -> nonzero -> embedding_bag (teal_quant/runtime/modules.py)
LINEAR_OPS = ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "teal_quant::", "aten::embedding_bag",
              "aten::hardshrink", "aten::nonzero")
ATTENTION_OPS = ("attention",)
ALLREDUCE_NAMES = ("nccl", "allreduce", "all_reduce")  # tensor parallel: kernels (CUDA) and operators (CPU)
TOP_OTHER = 10  # the largest "other" kernels listed in the breakdown
HEADROOM_BYTES = 4 << 30  # KV cache, activations, CUDA graph pools and the allocator's slack
FIT_FRACTION = 0.85  # of the GPU's memory the dense model may take (70B bf16, 141 GB, on a 150 GB H200: no)


@dataclass
class BenchOptions:
    """What `teal-quant bench` measures; `validate` rejects bad values with one clear line."""

    prompt_len: int = 128
    new_tokens: int = 128
    batch: int | tuple[int, ...] = 1  # one batch size or several (each variant is measured at each)
    sparsity: float | None = None  # default: the artifact's default level (an ARCH: the synthetic spec's)
    baselines: tuple[str, ...] | None = None  # None: bf16, int4 and (on CUDA) tinygemm
    device: str | None = None
    cuda_graph: bool | None = None  # None: on for CUDA, off on the CPU (the Decoder's rule)
    fuse_elementwise: bool = True  # one-launch RMSNorm / SiLU-and-mul / rotary on CUDA (teal_quant/runtime/elementwise.py)
    fused_step: bool = True  # the fused decode step on CUDA (teal_quant/runtime/decode_step.py); False: transformers' forward
    warmup: int = 8
    profile_steps: int = 4
    seed: int = 0
    bf16_extrapolate: bool | None = None  # None: only when the dense model does not fit in GPU memory
    extrapolate_layers: tuple[int, int] = (2, 6)
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    tp: int = 1  # tensor-parallel ranks: the WORLD_SIZE of the torchrun job

    @property
    def batches(self) -> tuple[int, ...]:
        return (self.batch,) if isinstance(self.batch, int) else tuple(self.batch)

    def validate(self) -> None:
        for name in ("prompt_len", "new_tokens"):
            if getattr(self, name) < 1:
                raise TealQuantError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.batches or min(self.batches) < 1:
            raise TealQuantError(f"--batch must be >= 1, got {','.join(map(str, self.batches))}")
        if len(set(self.batches)) != len(self.batches):
            raise TealQuantError(f"--batch: each size once, got {','.join(map(str, self.batches))}")
        if self.warmup < 1 or self.profile_steps < 1:
            raise TealQuantError("warm-up and profile steps must be >= 1")
        unknown = [b for b in (self.baselines or ()) if b not in BASELINES]
        if unknown:
            raise TealQuantError(f"--baselines: unknown baseline '{unknown[0]}' (choose from {', '.join(BASELINES)})")
        a, b = self.extrapolate_layers
        if not 1 <= a < b:
            raise TealQuantError(f"--extrapolate-layers: need two layer counts 1 <= a < b, got {a},{b}")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise TealQuantError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.tp < 1:
            raise TealQuantError(f"--tp must be >= 1, got {self.tp}")


def join_tensor_parallel(options: BenchOptions, device: torch.device) -> tuple[torch.device, int]:
    """(this rank's device, rank): `--tp N` must run as the N ranks of a torchrun job, and a torchrun job of N
    ranks must say --tp N (N independent benchmarks of one GPU each would all write the same results)."""
    from teal_quant import distributed

    launched = distributed.env_world_size()
    if launched != options.tp:
        if options.tp == 1:
            raise TealQuantError(f"launched as {launched} processes (WORLD_SIZE={launched}): pass --tp {launched} "
                                 "for tensor-parallel decoding")
        raise TealQuantError(f"--tp {options.tp}: run it as `torchrun --nproc-per-node {options.tp} -m teal_quant.cli "
                             f"bench ... --tp {options.tp}` (WORLD_SIZE is {launched})")
    if options.tp == 1:
        return device, 0
    world = distributed.init(device)
    return world.local_device(device), world.rank


def run_bench(target: str, options: BenchOptions, *, report: Callable[[str], None] | None = None) -> dict:
    """Benchmark `target` (an artifact directory, llama3-8b | llama3-70b, or a config.json) and return the results."""
    from teal_quant.distributed import agreement

    with agreement("preparing the benchmark"):  # under torchrun: an error on any rank stops every rank, said once
        options.validate()
        device = select_device(options.device, option="--device")
        device, rank = join_tensor_parallel(options, device)
        say = report if report is not None and rank == 0 else (lambda _msg: None)
        t0 = time.time()
        model, source = open_target(target, options, device)
        level = float(model.teal_sparsity)
        config = model.config
        baselines = options.baselines
        if baselines is None:
            baselines = BASELINES if device.type == "cuda" else CPU_BASELINES
        if "tinygemm" in baselines:
            from teal_quant.runtime.baselines import tinygemm_unsupported

            reason = tinygemm_unsupported(model)
            if reason is not None:
                raise TealQuantError(f"--baselines tinygemm: {reason}")
        if "bf16" in baselines and options.bf16_extrapolate and options.extrapolate_layers[1] >= config.num_hidden_layers:
            raise TealQuantError(f"--extrapolate-layers: {options.extrapolate_layers[1]} is not fewer than the model's "
                                 f"{config.num_hidden_layers} layers")
        needed = options.prompt_len + options.warmup + max(options.new_tokens, 2 * options.profile_steps) + 1
        if getattr(config, "max_position_embeddings", None) and needed > config.max_position_embeddings:
            raise TealQuantError(f"--prompt-len + --new-tokens exceed the model's max_position_embeddings {config.max_position_embeddings}")
    batches = options.batches
    generator = torch.Generator().manual_seed(options.seed)
    prompt = torch.randint(0, config.vocab_size, (max(batches), options.prompt_len), generator=generator).to(device)
    prompts = {b: prompt[:b] for b in batches}
    result = {
        "target": str(target), "source": source, "arch": _arch_summary(config),
        "device": _device_name(device), "dtype": str(_model_dtype(model)).replace("torch.", ""),
        "cuda_graph": (device.type == "cuda") if options.cuda_graph is None else options.cuda_graph,
        "elementwise": "fused" if options.fuse_elementwise and device.type == "cuda" else "eager",
        "fused_step": bool(options.fused_step and device.type == "cuda"),
        "prompt_len": options.prompt_len, "new_tokens": options.new_tokens, "batch": batches[0],
        "batches": list(batches), "baselines": list(baselines),
        "sparsity": level, "warmup_steps": options.warmup, "profile_steps": options.profile_steps,
        "tensor_parallel": options.tp,
        "versions": _versions(), "setup_seconds": round(time.time() - t0, 2), "variants": [],
    }

    def run(name: str, lv: float | None, fn: Callable[[torch.Tensor], dict]) -> None:
        for b in batches:
            say(f"measuring {name}" + ("" if lv is None else f" (level {lv:g})") + f", batch {b}")
            row = _guarded(name, lv, lambda b=b: fn(prompts[b]), fatal=options.tp > 1)
            result["variants"].append({**row, "batch": b})

    run("ours", level, lambda p: _measure_quantized(model, level, p, options, device))
    if "int4" in baselines:
        run("int4", 0.0, lambda p: _measure_quantized(model, 0.0, p, options, device))
    if "tinygemm" in baselines:
        _measure_tinygemm(model, run, options, device)
    if "bf16" in baselines:
        _measure_dense(model, run, options, device, say)
    _free(device)
    result["ratios_by_batch"] = {str(b): _ratios([v for v in result["variants"] if v["batch"] == b]) for b in batches}
    result["ratios"] = result["ratios_by_batch"][str(batches[0])]
    result["seconds"] = round(time.time() - t0, 2)
    return result


def open_target(target: str, options: BenchOptions, device: torch.device):
    """An artifact directory -> teal_quant.load; anything else is an architecture -> a synthetic model in memory."""
    from teal_quant.runtime.loading import load

    path = Path(str(target)).expanduser()
    if path.is_dir() and _is_artifact(path):
        from teal_quant.artifact.format import read_artifact

        quant = read_artifact(path).quant
        level = quant.default if options.sparsity is None else options.sparsity
        try:
            quant.level_index(level)
        except ValueError as e:
            raise TealQuantError(f"--sparsity: {e}") from None
        return (load(path, sparsity=level, device=device, tp=options.tp > 1),
                {"kind": "artifact", "path": str(path.resolve())})
    from dataclasses import replace

    from teal_quant.compression.synthetic import resolve_arch

    resolve_arch(target)  # a bad ARCH fails here, before any work
    spec = options.synthetic
    if options.sparsity is not None and options.sparsity > 0 and not any(abs(options.sparsity - lv) < 1e-9 for lv in spec.all_levels):
        spec = replace(spec, levels=tuple(sorted({*spec.levels, options.sparsity})))
    level = spec.default if options.sparsity is None else options.sparsity
    model = build_synthetic_model(target, spec, device=device, sparsity=level)
    if options.tp > 1:  # every rank drew the same weights (same seed): each keeps its shard
        from teal_quant.runtime.tensor_parallel import shard_for_tensor_parallel

        shard_for_tensor_parallel(model)
    return model, {"kind": "synthetic", "arch": str(target), "bits": spec.bits, "group_size": spec.group_size,
                   "levels": spec.all_levels, "seed": spec.seed}


def build_synthetic_model(arch: str | Path, spec: SyntheticSpec = SyntheticSpec(), *, device: str | torch.device | None = None,
                          sparsity: float | None = None, progress: Callable[[int], None] | None = None) -> nn.Module:
    """The model `teal_quant.load(write_synthetic(arch, ...))` would give, assembled directly on `device` from the
    synthetic generator's stream, one layer at a time (no disk: the 70B int4 artifact is ~40 GB).

    Same dtype rule as load(): STORAGE_DTYPE on CUDA, float32 on the CPU.
    """
    from teal_quant.compression.synthetic import STORAGE_DTYPE, SyntheticLayers, resolve_arch
    from teal_quant.runtime.assemble import assemble

    config = resolve_arch(arch)
    device = select_device(device)
    dtype = STORAGE_DTYPE if device.type == "cuda" else torch.float32
    layers = SyntheticLayers(config, spec, device)
    model = assemble(config, spec.quant_config(), layers.stream(progress), device=device, dtype=dtype, level=sparsity,
                     where=f"synthetic {arch}")
    model.synthetic_report = layers.report
    return model


def _is_artifact(path: Path) -> bool:
    try:
        return "quantization_config" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- variants
def _measure_quantized(model: nn.Module, level: float, prompt: torch.Tensor, options: BenchOptions, device) -> dict:
    from teal_quant.runtime.loading import set_sparsity

    set_sparsity(model, level)
    row = _measure(model, prompt, options, device)
    row["level"] = level
    return row


def _measure_tinygemm(model: nn.Module, run, options: BenchOptions, device) -> None:
    """The int4 weights through tinygemm (q/k/v and gate/up one product each), every batch; the TealLinear modules
    are put back afterwards. The conversion is checked on one projection first (a wrong packing would otherwise
    only show as a fast, wrong model)."""
    from teal_quant.runtime.baselines import TinyGemmLinear, swap_to_tinygemm

    def fail(_p) -> dict:
        raise RuntimeError(error)

    error = None
    try:
        name, probe = teal_linears(model)[0]
        with torch.no_grad():
            x = torch.randn(4, probe.in_features, device=device, dtype=torch.bfloat16)
            want = x.float() @ probe.dequantized_weight().float().t()
            got = TinyGemmLinear.from_quantized(probe.qweight, probe.scales, probe.zeros, probe.group_size)(x).float()
        err = float((got - want).norm() / want.norm())
        if not err < 2e-2:
            error = f"tinygemm conversion check failed on {name}: rel err {err:.3g}"
        restore = swap_to_tinygemm(model) if error is None else None
    except Exception as e:  # noqa: BLE001 - reported as a failed variant, the others still run
        error, restore = f"{type(e).__name__}: {first_line(e)}", None
    if error is not None:
        run("tinygemm", None, fail)
        return
    try:
        _free(device)
        run("tinygemm", None, lambda p: _measure(model, p, options, device))
    finally:
        restore()
        _free(device)


def _measure_dense(model: nn.Module, run, options: BenchOptions, device, say) -> None:
    """Destructive: turns `model` into the dense model (the last variant), q/k/v and gate/up fused into one
    nn.Linear each (like gpt-fast's wqkv), and measures every batch. Extrapolates when it does not fit."""
    dtype = torch.bfloat16 if device.type == "cuda" else _model_dtype(model)
    full_layers = int(model.config.num_hidden_layers)
    full_bytes = _dense_bytes(model, dtype)
    extrapolate = options.bf16_extrapolate
    if extrapolate is None:
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        extrapolate = total is not None and full_bytes + HEADROOM_BYTES > FIT_FRACTION * total
    if not extrapolate:
        def dense(p):
            if not getattr(model, "_bench_dense", False):
                to_dense_twin(model, dtype)
                model._bench_dense = True
            row = _measure(model, p, options, device)
            row["dtype"] = str(dtype).replace("torch.", "")
            return row

        run("bf16", None, dense)
        return
    small, big = options.extrapolate_layers
    if big >= full_layers:
        raise TealQuantError(f"--extrapolate-layers {small},{big}: the model has only {full_layers} layers")
    tied = _tied(model)
    embed_bytes = model.get_input_embeddings().weight.numel() * _element_size(dtype)
    points: dict[int, list[dict]] = {}
    rows: dict[int, dict] = {}
    for n in (big, small):  # the larger first: truncating further is free, growing back is not
        _truncate(model, n)
        to_dense_twin(model, dtype)
        _free(device)
        for b in options.batches:
            say(f"measuring bf16 at {n} layers, batch {b}")
            try:
                row = _measure(model, _bench_prompt(model, options, b, device), options, device)
            except Exception as e:  # noqa: BLE001
                if options.tp > 1:  # the other ranks wait in an all-reduce this rank will not reach
                    raise
                rows[b] = {"error": f"{type(e).__name__}: {first_line(e)}"}
                continue
            points.setdefault(b, []).append({"layers": n, **{k: row[k] for k in ("prefill_ms", "decode_ms_per_token",
                                                                                   "peak_memory_bytes")}})
            rows[b] = row

    def extrapolated(p) -> dict:
        b = p.shape[0]
        pts = sorted(points.get(b, []), key=lambda q: q["layers"])
        if len(pts) != 2:
            raise RuntimeError(rows.get(b, {}).get("error", "a reduced-depth measurement failed"))

        def fit(key: str) -> float | None:
            return depth_fit(pts, key, full_layers, grows=key != "peak_memory_bytes")

        decode_ms = fit("decode_ms_per_token")
        if decode_ms is None:
            t0, t1 = (q["decode_ms_per_token"] for q in pts)
            raise ValueError(f"decode took {t0:.3f} ms/token at {small} layers and {t1:.3f} at {big}: not growing with "
                             f"depth (noise larger than a layer's time), so no extrapolation to {full_layers} layers")
        read_bytes = full_bytes - (0 if tied else embed_bytes)
        return {
            "prefill_ms": fit("prefill_ms"), "decode_ms_per_token": decode_ms, "tokens_per_s": b * 1000.0 / decode_ms,
            "peak_memory_bytes": None if fit("peak_memory_bytes") is None else int(fit("peak_memory_bytes")),
            "weight_bytes_per_step": read_bytes, "bandwidth_gb_s": read_bytes / (decode_ms / 1000.0) / 1e9,
            "realized_sparsity": None, "breakdown": rows[b]["breakdown"], "dtype": str(dtype).replace("torch.", ""),
            "extrapolated": {
                "method": f"linear in the layer count, t(L) = a + b*L, fitted on {small} and {big} layers of the real "
                          f"shape and evaluated at L = {full_layers} (the dense model does not fit in GPU memory); "
                          f"the breakdown is the {small}-layer model's",
                "points": pts,
            },
        }

    run("bf16", None, extrapolated)


def depth_fit(points: list[dict], key: str, layers: int, *, grows: bool = False) -> float | None:
    """`key` at `layers` on the line through the two reduced-depth points; None when either point lacks it or, with
    `grows` (a time), when the deeper point is not larger: noise then exceeds a layer's share and the line would give
    a meaningless, possibly negative, time."""
    (l0, y0), (l1, y1) = [(q["layers"], q[key]) for q in points]
    if y0 is None or y1 is None or (grows and y1 <= y0):
        return None
    return y0 + (y1 - y0) / (l1 - l0) * (layers - l0)


def _bench_prompt(model: nn.Module, options: BenchOptions, batch: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(options.seed)
    prompt = torch.randint(0, model.config.vocab_size, (max(options.batches), options.prompt_len), generator=generator)
    return prompt[:batch].to(device)


def _measure(model: nn.Module, prompt: torch.Tensor, options: BenchOptions, device) -> dict:
    """One variant: eager profile + realized sparsity, then the timed prefill and decode."""
    from teal_quant.runtime.decoding import Decoder

    cuda = device.type == "cuda"
    _free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    batch, plen = prompt.shape
    if not options.fuse_elementwise:  # `teal_quant.load` fuses on CUDA: undo it for this comparison
        from teal_quant.runtime.elementwise import unfuse_elementwise

        unfuse_elementwise(model)
    fused_step = None if options.fused_step else False
    eager = Decoder(model, batch_size=batch, max_length=plen + options.warmup + 2 * options.profile_steps + 1,
                    cuda_graph=False, fuse_elementwise=options.fuse_elementwise, fused_step=fused_step)
    state = {"token": eager.prefill(prompt)}
    for _ in range(options.warmup):
        state["token"] = eager.step(state["token"])

    def eager_step() -> None:
        state["token"] = eager.step(state["token"])

    # the realized sparsity over a few steps with the counters on, then the profile with them off (as timed)
    reset_stats(model)
    eager.track_sparsity = True  # read by each eager step (the decoder's own choice, not the model's)
    for _ in range(options.profile_steps):
        eager_step()
    sparsity = _module_sparsity(model)
    eager.track_sparsity = False
    try:
        breakdown = _profile(eager_step, options.profile_steps, cuda)
    except Exception as e:  # noqa: BLE001 - e.g. no CUPTI: the timing still counts, the breakdown is missing
        breakdown = {"linear_ms": None, "attention_ms": None, "norm_rotary_ms": None, "allreduce_ms": None, "other_ms": None,
                     "error": f"{type(e).__name__}: {first_line(e)}"}
    fused = getattr(eager, "_fused", None) is not None
    eager = state = None  # free the eager decoder's cache before the timed one
    _free(device)

    decoder = Decoder(model, batch_size=batch, max_length=plen + options.warmup + options.new_tokens + 1,
                      cuda_graph=options.cuda_graph, fuse_elementwise=options.fuse_elementwise, fused_step=fused_step)
    token, prefill_ms = _timed(lambda: decoder.prefill(prompt), cuda)
    for _ in range(options.warmup):
        token = decoder.step(token)

    generated: list[torch.Tensor] = []

    def decode() -> torch.Tensor:
        t = token
        for _ in range(options.new_tokens):
            t = decoder.step(t)
            generated.append(t)  # no host sync: read after the timing
        return t

    _, decode_total_ms = _timed(decode, cuda)
    graph_error = getattr(decoder, "graph_error", None)  # the Decoder falls back to eager steps when capture fails
    decoder = None  # free its cache and graph
    ms = decode_total_ms / options.new_tokens
    nbytes = _weight_bytes(model, sparsity)
    realized = _size_weighted(model, sparsity)
    return {
        "layers": int(model.config.num_hidden_layers), "prefill_ms": prefill_ms, "decode_ms_per_token": ms,
        "tokens_per_s": batch * 1000.0 / ms, "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "weight_bytes_per_step": nbytes, "bandwidth_gb_s": nbytes / (ms / 1000.0) / 1e9,
        "realized_sparsity": realized, "sparsity_measured_modules": f"{len(sparsity)}/{len(teal_linears(model))}",
        "breakdown": breakdown, "cuda_graph_error": graph_error, "fused_step": fused, "extrapolated": None,
        # the greedy tokens of the timed decode (row 0; compare a --tp run with one GPU's)
        "tokens": torch.stack(generated, 1)[0].tolist() if generated else [],
    }


def _guarded(name: str, level: float | None, fn: Callable[[], dict], *, fatal: bool = False) -> dict:
    """A variant that fails is reported as failed (one line); the others still run. `fatal` (tensor parallel): the
    failure ends the run, since the other ranks wait in a collective this rank will not reach."""
    try:
        row = fn()
        status = "ok"
    except TealQuantError:
        raise
    except Exception as e:  # noqa: BLE001 - an OOM or kernel failure of one variant must not lose the others
        if fatal:
            raise
        row, status = {"error": f"{type(e).__name__}: {first_line(e)}"}, "failed"
    return {"variant": name, "level": level, "status": status, **{k: v for k, v in row.items() if k != "level"}}


# ---------------------------------------------------------------------------------------------- measurements
def _timed(fn: Callable[[], torch.Tensor], cuda: bool) -> tuple[torch.Tensor, float]:
    """(fn(), milliseconds): CUDA events around it on a GPU, perf_counter on the CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, float(start.elapsed_time(end))
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1000.0


def _profile(step: Callable[[], None], steps: int, cuda: bool) -> dict:
    """Per-step milliseconds of linear layers, attention and the rest, from torch.profiler over eager steps.

    CUDA: every GPU kernel, grouped by its name (ATTENTION_KERNELS, then LINEAR_KERNELS, else other).
    CPU: the top-level operators (no parent op), grouped by operator name (LINEAR_OPS, ATTENTION_OPS, else other).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1000.0 / steps
    groups = {"linear": 0.0, "attention": 0.0, "norm_rotary": 0.0, "allreduce": 0.0, "other": 0.0}
    other: dict[str, list[float]] = {}  # name -> [ms per step, calls per step] of the "other" group
    launches = 0
    for event in prof.events():
        name = event.name.lower()
        if cuda:
            if event.device_type != DeviceType.CUDA:
                continue
            us, kind = event.time_range.elapsed_us(), kernel_group(name)
        else:
            if event.cpu_parent is not None:
                continue
            us, kind = event.cpu_time_total, operator_group(name)
        groups[kind] += us / 1000.0 / steps
        launches += 1
        if kind == "other":
            entry = other.setdefault(event.name[:80], [0.0, 0.0])
            entry[0] += us / 1000.0 / steps
            entry[1] += 1 / steps
    total = sum(groups.values())
    top = sorted(other.items(), key=lambda kv: -kv[1][0])[:TOP_OTHER]
    return {
        **{f"{k}_ms": v for k, v in groups.items()},
        **{f"{k}_share": (v / total if total else None) for k, v in groups.items()},
        "eager_step_ms": wall_ms, "steps": steps,
        "launches_per_step": launches / steps,  # GPU kernels (CUDA) / top-level operators (CPU) per decode step
        "top_other": [{"name": n, "ms": round(v[0], 4), "calls": round(v[1], 2)} for n, v in top],
        "method": ("GPU kernel time per eager decode step (torch.profiler), grouped by kernel name" if cuda else
                   "CPU time of top-level operators per eager decode step (torch.profiler), grouped by operator name"),
    }


def kernel_group(name: str) -> str:
    """'allreduce' | 'attention' | 'linear' | 'norm_rotary' | 'other' for a GPU kernel name (NCCL's kernels are the
    tensor-parallel all-reduces; attention before linear: fmha names contain "cutlass"). transformers' eager norms and
    rotary are generic elementwise kernels: they count as other."""
    name = name.lower()
    if any(k in name for k in ALLREDUCE_NAMES):
        return "allreduce"
    if any(k in name for k in ATTENTION_KERNELS):
        return "attention"
    if any(k in name for k in LINEAR_KERNELS):
        return "linear"
    return "norm_rotary" if any(k in name for k in NORM_ROTARY_KERNELS) else "other"


def operator_group(name: str) -> str:
    """'linear' | 'attention' | 'allreduce' | 'other' for a top-level CPU operator name."""
    name = name.lower()
    if any(k in name for k in ALLREDUCE_NAMES):
        return "allreduce"
    if name.startswith(LINEAR_OPS):
        return "linear"
    return "attention" if any(k in name for k in ATTENTION_OPS) else "other"


def _module_sparsity(model: nn.Module) -> dict[str, float]:
    out = {}
    for name, m in teal_linears(model):
        seen = float(m.input_count)
        if seen > 0:
            out[name] = float(m.zero_count) / seen
    return out


def _size_weighted(model: nn.Module, sparsity: dict[str, float]) -> float | None:
    """Size-weighted realized sparsity over the modules whose counters saw inputs (None when none did)."""
    linears = [(n, m) for n, m in teal_linears(model) if n in sparsity]
    if not linears:
        return None
    return sum(sparsity[n] * m.weight_size for n, m in linears) / sum(m.weight_size for _, m in linears)


def _weight_bytes(model: nn.Module, sparsity: dict[str, float]) -> int:
    """Bytes of weights one decode step reads: surviving rows of each packed W^T (all of them at level 0) plus
    every scale and zero (nearly every group keeps a row), and every other parameter but the embedding table."""
    total = 0.0
    fallback = _size_weighted(model, sparsity) or 0.0  # a module whose counters saw nothing: the measured mean
    for name, m in teal_linears(model):
        total += (1.0 - sparsity.get(name, fallback)) * _nbytes(m.qweight) + _nbytes(m.scales) + _nbytes(m.zeros)
        total += _nbytes(m.bias) if m.bias is not None else 0
    for m in _quantized_heads(model):  # a quantized lm_head (QuantLinear): every packed byte, no threshold
        total += sum(_nbytes(t) for t in (m.qweight, m.scales, m.zeros, m.bias) if t is not None)
    from teal_quant.runtime.baselines import TinyGemmLinear

    for m in model.modules():  # the tinygemm baseline's weights are buffers: every byte is read
        if isinstance(m, TinyGemmLinear):
            total += _nbytes(m.packed) + _nbytes(m.scales_and_zeros)
    embed = model.get_input_embeddings().weight
    tied = _tied(model)
    seen = set()
    for p in model.parameters():
        if id(p) in seen or (p is embed and not tied):
            continue
        seen.add(id(p))
        total += p.nbytes
    return int(total)


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of this tensor's own elements (a fused member's buffers are column views of its group's)."""
    return t.numel() * t.element_size()


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and getattr(out, "weight", None) is model.get_input_embeddings().weight


def _quantized_heads(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------- dense baseline
def _dense_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the dense model (all parameters in `dtype`, the embedding table included), before building it."""
    size = _element_size(dtype)
    n = sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
            for m in [*(m for _, m in teal_linears(model)), *_quantized_heads(model)])
    n += sum({id(p): p.numel() for p in model.parameters()}.values())
    return n * size


def to_dense_twin(model: nn.Module, dtype: torch.dtype) -> None:
    """The dense baseline, in place: every TealLinear (and a quantized lm_head) becomes an nn.Linear with its dequantized
    weights, one at a time (the packed buffers are freed as it goes, so the peak stays near the dense model's size),
    then q/k/v and gate/up one nn.Linear each (like gpt-fast's wqkv). Fused groups (teal_quant.runtime.fusion, made
    by `load` and the Decoder on CUDA) are split back first."""
    unfuse_projections(model)
    packed = [n for n, _ in teal_linears(model)] + [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in packed:
        m = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        with torch.device("meta"):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
        linear.weight = nn.Parameter(m.dequantized_weight().to(dtype).contiguous(), requires_grad=False)
        if m.bias is not None:
            linear.bias = nn.Parameter(m.bias.to(dtype), requires_grad=False)
        setattr(model.get_submodule(parent_name), child, linear)
        del m
    for p in model.parameters():
        if p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
    fuse_linear_projections(model)


def _truncate(model: nn.Module, layers: int) -> None:
    """Keep the first `layers` decoder layers (real shapes) and tell the config, so caches are sized to match."""
    model.model.layers = nn.ModuleList(list(model.model.layers)[:layers])
    model.config.num_hidden_layers = layers
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:layers]


# ---------------------------------------------------------------------------------------------- helpers
def _ratios(variants: list[dict]) -> dict:
    ok = {v["variant"]: v for v in variants if v["status"] == "ok"}
    ours = ok.get("ours")
    out = {}
    for base in BASELINES:
        if ours and base in ok:
            out[f"ours_over_{base}"] = ours["tokens_per_s"] / ok[base]["tokens_per_s"]
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _model_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _arch_summary(config) -> dict:
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}


def _versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "triton": None}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def print_bench(result: dict) -> None:
    """The summary table: one row per variant, times with the bandwidth they imply, ratios against ours."""
    from rich.table import Table

    from teal_quant.progress import console
    from teal_quant.report import human_bytes

    arch = result["arch"]
    title = (f"teal-quant bench: {result['target']} ({arch['num_hidden_layers']} layers, hidden {arch['hidden_size']}) on "
             f"{result['device']}, batch {result['batch']}, prompt {result['prompt_len']}, {result['new_tokens']} new tokens, "
             f"CUDA graphs {'on' if result['cuda_graph'] else 'off'}")
    tp = result.get("tensor_parallel", 1)
    if tp > 1:
        title += f", tensor parallel over {tp} ranks (bytes, GB/s and memory per rank)"
    table = Table(title=title)
    for col in ("batch", "variant", "level", "realized sparsity", "prefill ms", "decode ms/token", "tok/s", "weights read/step",
                "GB/s", "peak memory", f"{_breakdown_header(tp)} (eager, ms)", "ours is"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    ours_at = {v.get("batch"): v for v in result["variants"] if v["variant"] == "ours" and v["status"] == "ok"}
    ours = ours_at.get(result["batch"])
    for v in result["variants"]:
        name = v["variant"] + (" (extrapolated)" if v.get("extrapolated") else "")
        if v["status"] != "ok":
            table.add_row(str(v.get("batch", "")), name, "", f"[red]failed: {v['error']}[/red]", *[""] * 8)
            continue
        b = v["breakdown"]
        mine = ours_at.get(v.get("batch"))
        speedup = "" if mine is None or v is mine else f"{mine['tokens_per_s'] / v['tokens_per_s']:.2f}x"
        table.add_row(
            str(v.get("batch", "")), name, "-" if v["level"] is None else f"{v['level']:g}",
            "-" if v["realized_sparsity"] is None else f"{v['realized_sparsity']:.3f}",
            _fmt(v['prefill_ms'], '.2f'), f"{v['decode_ms_per_token']:.3f}", f"{v['tokens_per_s']:.1f}",
            human_bytes(v["weight_bytes_per_step"]), f"{v['bandwidth_gb_s']:.1f}",
            "-" if v["peak_memory_bytes"] is None else human_bytes(v["peak_memory_bytes"]),
            _breakdown_text(b, allreduce=tp > 1), speedup,
        )
    console.print(table)
    for v in result["variants"]:
        if v.get("cuda_graph_error"):
            console.print(f"{v['variant']}: CUDA graph capture failed, decode ran eagerly ({v['cuda_graph_error']})")
        if v.get("extrapolated"):
            pts = ", ".join(f"{p['layers']} layers {p['decode_ms_per_token']:.3f} ms" for p in v["extrapolated"]["points"])
            console.print(f"{v['variant']} extrapolated: {v['extrapolated']['method']} ({pts})")
    if ours is not None and "method" in ours["breakdown"]:
        console.print(f"breakdown: {ours['breakdown']['method']}")


def _breakdown_header(tp: int) -> str:
    return ("linear / attention / norm+rotary / all-reduce / other" if tp > 1
            else "linear / attention / norm+rotary / other")


def _breakdown_text(b: dict, launches: bool = False, allreduce: bool = False) -> str:
    if b.get("linear_ms") is None:
        return f"n/a ({b.get('error', '?')})"
    text = (f"{b['linear_ms']:.3f} / {b['attention_ms']:.3f} / {b.get('norm_rotary_ms') or 0.0:.3f} / "
            + (f"{b.get('allreduce_ms') or 0.0:.3f} / " if allreduce else "") + f"{b['other_ms']:.3f}")
    if launches and b.get("launches_per_step") is not None:
        text += f" ({b['launches_per_step']:.0f} kernels)"
    return text


# ---------------------------------------------------------------------------------------------- reports
def check_targets(result: dict | None, targets: dict[str, float]) -> dict:
    """Targets of a bench result: {name: {want, got, met}}. A name is METRIC or METRIC@BATCH (default: the first
    batch) with METRIC one of `<variant>_tokens_per_s` (e.g. ours_tokens_per_s, tinygemm_tokens_per_s), a ratio
    `ours_over_<baseline>`, or `ours_nonlinear_ms` (attention + norm+rotary + other kernel ms per eager step: an
    upper bound). met is got >= want (got <= want for *_ms), None (and got None) when the variants it needs failed
    or the result is missing."""
    out = {}
    result = result or {}
    for key, want in targets.items():
        metric, _, at = key.partition("@")
        batch = int(at) if at else result.get("batch")
        rows = {v["variant"]: v for v in result.get("variants", []) if v.get("batch", result.get("batch")) == batch
                and v["status"] == "ok"}
        got = None
        if metric.endswith("_tokens_per_s") and metric[: -len("_tokens_per_s")] in rows:
            got = rows[metric[: -len("_tokens_per_s")]]["tokens_per_s"]
        elif metric.startswith("ours_over_"):
            ratios = (result.get("ratios_by_batch") or {}).get(str(batch)) or (
                result.get("ratios", {}) if batch == result.get("batch") else {})
            got = ratios.get(metric)
        elif metric == "ours_nonlinear_ms" and "ours" in rows:
            b = rows["ours"]["breakdown"]
            parts = [b.get(k) for k in ("attention_ms", "norm_rotary_ms", "other_ms")]
            got = None if b.get("attention_ms") is None else sum(x or 0.0 for x in parts)
        upper = metric.endswith("_ms")
        out[key] = {"want": want, "got": got, "bound": "<=" if upper else ">=",
                    "met": None if got is None else (got <= want if upper else got >= want)}
    return out


def targets_markdown(checked: dict) -> str:
    """One line for check_targets' answer; no targets: a comparison run."""
    if not checked:
        return "targets: none (a comparison run)"
    return "targets: " + "; ".join(
        f"{k} {t.get('bound', '>=')} {t['want']:g}: got {_fmt(t['got'], '.2f')} -> "
        f"{'met' if t['met'] else 'NOT met' if t['met'] is False else 'not measured'}" for k, t in checked.items())


def markdown_lines(result: dict) -> list[str]:
    """A bench result as markdown: one table row per variant (kernels per eager step with the breakdown), the
    extrapolation of a variant that needed it, the ratios, and the largest 'other' kernels of ours."""
    tp = result.get("tensor_parallel", 1)
    lines = ["| batch | variant | level | realized sparsity | prefill ms | decode ms/token | tok/s | weights read/step "
             f"(GB) | GB/s | peak memory (GB) | {_breakdown_header(tp)} (eager kernel ms per step) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in result["variants"]:
        label = v["variant"] + (" (extrapolated)" if v.get("extrapolated") else "")
        if v["status"] != "ok":
            lines.append(f"| {v.get('batch', '')} | {label} | | failed: {v.get('error', '?')} | | | | | | | |")
            continue
        lines.append(
            f"| {v.get('batch', '')} | {label} | {_fmt(v['level'], 'g')} | {_fmt(v['realized_sparsity'], '.3f')} | {_fmt(v['prefill_ms'], '.1f')} | "
            f"{v['decode_ms_per_token']:.3f} | {v['tokens_per_s']:.1f} | {v['weight_bytes_per_step'] / 1e9:.2f} | "
            f"{v['bandwidth_gb_s']:.0f} | {_fmt(v['peak_memory_bytes'] and v['peak_memory_bytes'] / 1e9, '.1f')} | "
            f"{_breakdown_text(v['breakdown'], launches=True, allreduce=tp > 1)} |")
    for v in result["variants"]:
        if v.get("extrapolated"):
            pts = ", ".join(f"{p['layers']} layers: {p['decode_ms_per_token']:.3f} ms/token"
                            for p in v["extrapolated"]["points"])
            lines += ["", f"{v['variant']} is extrapolated: {v['extrapolated']['method']} ({pts})."]
    by_batch = result.get("ratios_by_batch") or {str(result.get("batch", 1)): result.get("ratios", {})}
    lines += [""] + [f"ratios (tok/s) at batch {b}: " + ", ".join(f"{k} {val:.2f}x" for k, val in r.items())
                     for b, r in by_batch.items()]
    ours = next((v for v in result["variants"] if v["variant"] == "ours" and v["status"] == "ok"), None)
    top = (ours or {}).get("breakdown", {}).get("top_other") or []
    if top:
        lines += ["", f"largest 'other' kernels of ours at batch {ours.get('batch')} (eager profile, ms per step / "
                  "calls per step): " + "; ".join(
            f"`{t['name']}` {t['ms']:.3f} / {t['calls']:g}" for t in top)]
    return lines


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
