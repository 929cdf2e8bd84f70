"""What a run will need, predicted from the config alone: `teal-quant run RECIPE --plan`, and the check before a run.

From config.json, the safetensors index (or the shard files' sizes) and the recipe, without loading a weight:

- disk: the artifact, the writer's pending shard spilled for --resume, two copies of the hidden states (the
  checkpoint alternates), and the Hub shards still to download (all of them, or with model.keep_download false the
  most that are on disk at once);
- host memory: the process itself, the hidden-state buffer (memory mode), the writer's pending shard, one layer's
  tensors as read, the embedding while the calibration tokens are embedded;
- GPU memory: one layer's float weights in the compute dtype and the activations of one batch and of the greedy
  search's token subset;
- time per layer: the layer's matmul FLOPs in every pass (histogram capture, the greedy search's block evaluations
  counted by running the real search on a stand-in error, a GPTQ Hessian pass, propagation) at the matmul rate
  measured on this machine for a second, plus the hidden-state checkpoint at the disk's measured write rate.

The constants below were fitted to one measured run on an H200 (benchmarks/results/scale70_h200.md shows the
predictions beside the measurements); on a CPU the per-evaluation overhead is larger than on a GPU, so its time is an
underestimate. The plan is an estimate, said as one.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from teal_quant.architecture import build_skeleton, projection_shapes
from teal_quant.compression.recipe import Recipe, parse_size
from teal_quant.compression.sources.hub import END, START, tensor_use
from teal_quant.devices import resolve_dtype, select_device
from teal_quant.errors import TealQuantError

GB = 1e9
PROCESS_HOST_BYTES = 1.2 * GB  # python, torch, transformers, tokenizer
CUDA_HOST_BYTES = 1.5 * GB  # the CUDA context and libraries' host side
CUDA_CONTEXT_BYTES = 0.6 * GB  # on the GPU, outside torch's allocator
# Fitted to the H200 measurement of benchmarks/results/scale70_h200.md (the constants a later run tests):
MATMUL_EFFICIENCY = 0.55  # dense passes, of the probe's rate: batches of 16k tokens with norms, rotary, attention between
GREEDY_MATMUL_EFFICIENCY = 0.75  # greedy evaluations: a few large tail matmuls each (4k x 8k x 28k at 70B width)
EVALUATION_OVERHEAD_S = 2e-3  # per greedy block evaluation: kernel launches, thresholds, the error sum
HOST_SLACK = 1.45  # measured peak RSS / the sum of the terms below (23.4 / 16.2 GB): allocator and page-cache slack
FALLBACK_WRITE_BYTES_PER_S = 1.0 * GB


class PlanError(TealQuantError):
    """The machine cannot hold the run (disk, host memory, GPU memory): one line naming what is short."""


@dataclass
class Machine:
    """What this machine has, measured now."""

    device: str
    host_total: int
    host_available: int
    gpu_name: str | None
    gpu_total: int | None
    disk_free: int
    disk_path: Path
    cache_free: int | None  # the Hub cache's file system, when it is another one
    matmul_flops_per_s: float
    disk_write_bytes_per_s: float
    histogram_elements_per_s: float


@dataclass
class RunPlan:
    """Predicted needs of one run (bytes, seconds) and the machine they were compared with."""

    model: str
    layers: int
    params_per_layer: int
    samples: int
    seq_len: int
    hidden_bytes: int
    hidden_storage: str
    artifact_bytes: int
    download_bytes: int  # Hub shards not in the cache yet
    download_peak_bytes: int  # downloaded shards on disk at once (all of them unless keep_download is false)
    disk_bytes: int
    host_bytes: int
    gpu_bytes: int
    seconds_per_layer: float
    layer_seconds: dict[str, float]  # the parts of seconds_per_layer
    greedy_evaluations: int
    machine: Machine
    problems: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_layer * self.layers

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "machine"}
        out["machine"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.machine.__dict__.items()}
        out["total_seconds"] = self.total_seconds
        return out

    def check(self, *, strict: bool = False) -> None:
        """Raise PlanError for the first need the machine cannot meet. Host memory is compared with what is available
        now when `strict` (--plan), else with the machine's total (a run refuses only what cannot fit at all)."""
        problems = self.problems if strict else [p for p in self.problems if not p.startswith("host memory")]
        if not strict and self.host_bytes > self.machine.host_total:
            problems = [f"host memory: about {self.host_bytes / GB:.1f} GB needed, this machine has "
                        f"{self.machine.host_total / GB:.1f} GB; set runtime.hidden_storage: disk or "
                        "runtime.hidden_dtype: bfloat16, or fewer calibration samples", *problems]
        if problems:
            raise PlanError(problems[0])


def probe_matmul(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of a square-ish matmul in `dtype` on `device`, timed for about `seconds`."""
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm up (and, on CUDA, load the kernels)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        c = a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    del c
    return 2.0 * n ** 3 * count / (time.perf_counter() - t0)


def probe_histogram(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Elements/s of AbsHistogram.update (the activation histograms of the capture pass) on `device`."""
    from teal_quant.compression.calibrate.histogram import AbsHistogram

    n = 1 << (24 if device.type == "cuda" else 20)
    x = torch.randn(n, device=device, dtype=dtype)
    hist = AbsHistogram(device=device)
    hist.update(x)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        hist.update(x)
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return n * count / (time.perf_counter() - t0)


def probe_disk_write(folder: Path, nbytes: int = 64 * 2**20) -> float:
    """Bytes/s of writing `nbytes` to a temporary file in `folder` (fsync'd), or a fallback if it cannot."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        chunk = os.urandom(2**20)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".teal-quant-plan-") as f:
            t0 = time.perf_counter()
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            return nbytes / max(time.perf_counter() - t0, 1e-6)
    except OSError:
        return FALLBACK_WRITE_BYTES_PER_S


def host_memory() -> tuple[int, int]:
    """(total, available) host memory in bytes (/proc/meminfo; os.sysconf elsewhere)."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def detect_machine(device: torch.device, compute_dtype: torch.dtype, out: Path, cache: Path | None, *,
                   timing: bool = True) -> Machine:
    """The machine's memory, GPU and free disk; with `timing`, also its matmul rate and disk write rate (a second of
    probes), which the time per layer needs."""
    total, available = host_memory()
    gpu_name = gpu_total = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu_name, gpu_total = props.name, int(props.total_memory)
    where = existing_ancestor(out.parent)
    cache_free = None
    if cache is not None:
        cache_where = existing_ancestor(cache)
        if os.stat(cache_where).st_dev != os.stat(where).st_dev:
            cache_free = shutil.disk_usage(cache_where).free
    return Machine(device=str(device), host_total=total, host_available=available, gpu_name=gpu_name,
                   gpu_total=gpu_total, disk_free=shutil.disk_usage(where).free, disk_path=where, cache_free=cache_free,
                   matmul_flops_per_s=probe_matmul(device, compute_dtype) if timing else math.nan,
                   disk_write_bytes_per_s=probe_disk_write(where) if timing else math.nan,
                   histogram_elements_per_s=probe_histogram(device, compute_dtype) if timing else math.nan)


def estimated_artifact_bytes(config, bits: int, group_size: int, dtype_bytes: int) -> int:
    """A rough size of the artifact from the model config alone: the seven projections of every layer at `bits`
    per weight plus a scale and a zero point (model dtype) per group, the embedding (and an untied LM head) in the
    model dtype, plus 5 % and 16 MB for norms, thresholds, tokenizer and metadata."""
    linear = config.num_hidden_layers * sum(k * n for k, n in projection_shapes(config).values())
    quantized = linear * bits / 8 + linear / (group_size if group_size > 0 else config.hidden_size) * 2 * dtype_bytes
    embedding = config.vocab_size * config.hidden_size * dtype_bytes * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return int((quantized + embedding) * 1.05) + 16 * 2**20


def greedy_evaluation_counts(sizes: dict[str, int], levels: list[float], step: float,
                             search: str = "exact") -> dict[str, int]:
    """How many block evaluations of the greedy search raise each projection ("first": the all-zero reference), counted
    by running the real search (calibrate.allocation.greedy_allocation) on a stand-in error, sum of size * sparsity^2:
    the count depends on the levels, the step and the search mode far more than on the error's exact values."""
    from teal_quant.compression.calibrate.allocation import effective_sparsity, greedy_allocation

    counts = {"first": 0, **{p: 0 for p in sizes}}
    positive = [lv for lv in levels if lv > 0]
    if not positive:
        return counts
    base = {p: 0.0 for p in sizes}  # the search's current allocation: each candidate raises one projection of it
    since_accept: list[tuple[float, dict[str, float]]] = []
    total = sum(sizes.values())

    def block_errors(allocs) -> list[float]:
        errors = [sum(sizes[p] * a[p] ** 2 for p in a) / total for a in allocs]
        for a, e in zip(allocs, errors):
            changed = [p for p in a if a[p] != base[p]]
            counts[changed[0] if len(changed) == 1 else "first"] += 1
            since_accept.append((e, dict(a)))
        return errors

    def accepted(effective: float) -> None:
        """The accepted candidate: the least-error one measured since the last step that reaches `effective`."""
        match = [(e, a) for e, a in since_accept if abs(effective_sparsity(a, sizes) - effective) < 1e-9]
        if match:
            base.update(min(match, key=lambda t: t[0])[1])
        since_accept.clear()

    greedy_allocation(block_errors, sizes, positive, step, progress=accepted, search=search)
    return counts


def layer_flops(config, tokens: int, seq_len: int) -> tuple[float, float]:
    """(attention-part FLOPs, MLP-part FLOPs) of one dense layer over `tokens` tokens in windows of seq_len."""
    shapes = projection_shapes(config)
    attn_params = sum(k * n for p, (k, n) in shapes.items() if p in ("q", "k", "v", "o"))
    mlp_params = sum(k * n for p, (k, n) in shapes.items() if p in ("gate", "up", "down"))
    q_width = shapes["q"][1]
    scores = 2.0 * tokens * seq_len * q_width  # QK^T and AV, causal (half of 2 x 2 x T x d per token)
    return 2.0 * attn_params * tokens + scores, 2.0 * mlp_params * tokens


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_run(recipe: Recipe, output_dir: str | Path | None = None, *, src=None, machine: Machine | None = None,
             timing: bool = True, device: torch.device | None = None) -> RunPlan:
    """The predicted needs of `recipe` on this machine. `src` (an opened ModelSource) is used when given; otherwise
    the model is opened for its config and index only (a Hub model: its metadata is downloaded, no shard).
    `timing` False skips the probes the time per layer needs (the check before a run only needs the bytes)."""
    from teal_quant.compression.sources import open_model

    if src is None:
        src = open_model(recipe.model.source, gguf_file=recipe.model.gguf_file, revision=recipe.model.revision,
                         keep_download=recipe.model.keep_download)
    config = src.config
    out = Path(output_dir or recipe.output.dir)
    # `device`: plan for that device instead of the recipe's (with `machine`, e.g. to replan a measured run elsewhere)
    device = device or select_device(recipe.runtime.device, option="runtime.device")
    compute_dtype = resolve_dtype(recipe.runtime.dtype, torch.float32) if recipe.runtime.dtype != "auto" else torch.float32
    hidden_dtype = compute_dtype if recipe.runtime.hidden_dtype == "auto" else resolve_dtype(recipe.runtime.hidden_dtype, None)
    source_dtype = torch.float32 if src.gguf_file else resolve_dtype("auto", getattr(config, "dtype", None))
    artifact_dtype = resolve_dtype(recipe.model.dtype, getattr(config, "dtype", None))
    cal, qz = recipe.calibration, recipe.quantization
    bits = qz.bits
    group = qz.group_size
    if qz.method == "from_checkpoint" and getattr(src, "fmt", None) is not None:
        bits, group = src.fmt.bits, src.fmt.group_size

    # sizes from the meta skeleton: exact parameter counts, no weight read
    skeleton = build_skeleton(config, torch.float32)
    numel = {k: v.numel() for k, v in skeleton.state_dict().items()}
    layer0 = skeleton.model.layers[0]
    params_per_layer = sum(p.numel() for p in layer0.state_dict().values())
    layers = int(config.num_hidden_layers)
    d = config.hidden_size
    b_src, b_c, b_h = _dtype_bytes(source_dtype), _dtype_bytes(compute_dtype), _dtype_bytes(hidden_dtype)
    hidden_bytes = cal.samples * cal.seq_len * d * b_h
    artifact_bytes = estimated_artifact_bytes(config, bits, group, _dtype_bytes(artifact_dtype))
    pending_bytes = min(parse_size(recipe.output.max_shard_size), artifact_bytes)

    # Hub shards: sizes from the config's shapes (the index names which tensors each holds)
    download_bytes = download_peak = 0
    cache = None
    if src.hub is not None:
        cache = src.hub.folder.parents[2]
        sizes: dict[str, int] = {}
        first: dict[str, int] = {}
        for name, path in src._index.items():
            sizes[path.name] = sizes.get(path.name, 0) + numel.get(name, 0) * b_src
            first[path.name] = min(first.get(path.name, END), tensor_use(name))
        missing = set(src.hub.missing())
        download_bytes = sum(sizes[f] for f in missing)
        if src.hub.keep:
            download_peak = download_bytes
        else:
            steps = [START, *range(layers), END]
            download_peak = max(sum(sizes[f] for f in missing if first[f] <= s <= src.hub.last_use[f]) for s in steps)
    disk_bytes = artifact_bytes + pending_bytes + 2 * hidden_bytes + download_peak

    # host memory
    memory_hidden = hidden_bytes if recipe.runtime.hidden_storage == "memory" else 0
    base = PROCESS_HOST_BYTES + (CUDA_HOST_BYTES if device.type == "cuda" else 0)
    embed_bytes = config.vocab_size * d * b_src
    layer_read = params_per_layer * b_src
    cpu_compute = 0
    if device.type == "cpu":  # the layer, its activations and the greedy subset live in host memory too
        cpu_compute = _gpu_working_set(config, params_per_layer, recipe, b_c)
    start_phase = embed_bytes * 2 + memory_hidden + cal.samples * cal.seq_len * 8 * 16
    layer_phase = memory_hidden + pending_bytes + 2 * layer_read + cpu_compute  # a layer as read and as copied
    end_phase = memory_hidden + pending_bytes + 2 * embed_bytes  # lm_head read while the last shard is pending
    host_bytes = int((base + max(start_phase, layer_phase, end_phase)) * HOST_SLACK)
    gpu_bytes = int(CUDA_CONTEXT_BYTES + _gpu_working_set(config, params_per_layer, recipe, b_c)) if device.type == "cuda" else 0

    # time per layer
    machine = machine or detect_machine(device, compute_dtype, out, cache, timing=timing)
    parts, evaluations = layer_seconds(config, recipe, machine, hidden_bytes, artifact_bytes, params_per_layer * b_src)

    problems = []
    need = {"disk": (disk_bytes if machine.cache_free is None else disk_bytes - download_peak, machine.disk_free,
                     f"on '{machine.disk_path}'")}
    if machine.cache_free is not None:
        need["disk of the Hub cache"] = (download_peak, machine.cache_free, "")
    for what, (want, have, where) in need.items():
        if want > have:
            problems.append(f"{what}: about {want / GB:.1f} GB needed (artifact {artifact_bytes / GB:.1f} GB, "
                            f"hidden-state checkpoints {2 * hidden_bytes / GB:.1f} GB, downloads "
                            f"{download_peak / GB:.1f} GB), only {have / GB:.1f} GB free {where}".rstrip())
    if host_bytes > machine.host_available:
        problems.append(f"host memory: about {host_bytes / GB:.1f} GB needed, {machine.host_available / GB:.1f} GB "
                        f"available; set runtime.hidden_storage: disk or runtime.hidden_dtype: bfloat16, or fewer "
                        "calibration samples")
    if machine.gpu_total is not None and gpu_bytes > machine.gpu_total:
        problems.append(f"GPU memory: about {gpu_bytes / GB:.1f} GB needed, the {machine.gpu_name} has "
                        f"{machine.gpu_total / GB:.1f} GB; use fewer calibration tokens per batch or greedy.tokens")
    return RunPlan(model=recipe.model.source, layers=layers, params_per_layer=params_per_layer, samples=cal.samples,
                   seq_len=cal.seq_len, hidden_bytes=hidden_bytes, hidden_storage=recipe.runtime.hidden_storage,
                   artifact_bytes=artifact_bytes, download_bytes=download_bytes, download_peak_bytes=download_peak,
                   disk_bytes=disk_bytes, host_bytes=host_bytes, gpu_bytes=gpu_bytes,
                   seconds_per_layer=sum(parts.values()), layer_seconds=parts, greedy_evaluations=evaluations,
                   machine=machine, problems=problems)


def layer_seconds(config, recipe: Recipe, machine: Machine, hidden_bytes: int, artifact_bytes: int,
                  layer_read_bytes: int) -> tuple[dict[str, float], int]:
    """Predicted seconds of one layer by stage, and the greedy search's block evaluations.

    Matmul FLOPs at MATMUL_EFFICIENCY of the probed rate; histogram updates at the probed rate of
    AbsHistogram.update; each block evaluation recomputes only what calibrate.layer.BlockEvaluator must (raising
    down: down on the tail rows; gate or up: it and down; o: o and the MLP; q: q on the tail, attention, o and the
    MLP; k or v: it on every row of the subset, attention, o and the MLP) plus EVALUATION_OVERHEAD_S of launches and
    bookkeeping; the writes (hidden-state checkpoint, the layer's share of the artifact) at the probed disk rate."""
    cal, sp, qz = recipe.calibration, recipe.sparsity, recipe.quantization
    rate = machine.matmul_flops_per_s * MATMUL_EFFICIENCY
    greedy_rate = machine.matmul_flops_per_s * GREEDY_MATMUL_EFFICIENCY
    shapes = projection_shapes(config)
    d, inter = config.hidden_size, config.intermediate_size
    tokens = cal.samples * cal.seq_len
    attn, mlp = layer_flops(config, tokens, cal.seq_len)
    dense_pass = (attn + mlp) / rate
    hist_elements = tokens * (shapes["q"][0] + shapes["o"][0] + shapes["gate"][0] + shapes["down"][0])
    if sp.criterion == "weight_aware":  # one histogram per projection instead of per activation point
        hist_elements = tokens * sum(k for k, _ in shapes.values())
    capture = dense_pass + hist_elements / machine.histogram_elements_per_s
    n_subset = min(cal.samples, max(1, math.ceil(sp.greedy.tokens / cal.seq_len)))
    subset, tail = n_subset * cal.seq_len, n_subset * cal.seq_len * sp.greedy.last_fraction
    down = 2.0 * inter * d * tail
    gate_up = 2.0 * d * inter * tail + down
    mlp_all = 6.0 * d * inter * tail
    o = 2.0 * shapes["o"][0] * d * tail + mlp_all
    core = 4.0 * tail * cal.seq_len * shapes["q"][1]  # tail queries against every key: QK^T and AV
    q = 2.0 * d * shapes["q"][1] * tail + core + o
    kv = 2.0 * d * shapes["k"][1] * subset + core + o
    cost = {"first": q + 2 * kv, "q": q, "k": kv, "v": kv, "o": o, "gate": gate_up, "up": gate_up, "down": down}
    evaluations, allocate = 0, 0.0
    if sp.allocation == "greedy":
        counts = greedy_evaluation_counts({p: k * n for p, (k, n) in shapes.items()}, sp.all_levels, sp.greedy.step,
                                          sp.greedy.search)
        evaluations = sum(counts.values())
        allocate = sum(cost[p] * n for p, n in counts.items()) / greedy_rate + evaluations * EVALUATION_OVERHEAD_S
    finals = len(sp.all_levels) * (2 if sp.allocation == "greedy" else 1)  # the reported errors, every level
    allocate += finals * (cost["first"] / greedy_rate + EVALUATION_OVERHEAD_S)
    hessian = dense_pass * min(1.0, (qz.gptq.samples or cal.samples) / cal.samples) if qz.method == "gptq" else 0.0
    io = (layer_read_bytes + hidden_bytes + artifact_bytes / config.num_hidden_layers) / machine.disk_write_bytes_per_s
    return {"capture": capture, "allocate": allocate, "hessian": hessian, "propagate": dense_pass, "io": io}, evaluations


def _gpu_working_set(config, params_per_layer: int, recipe: Recipe, b_c: int) -> float:
    """One layer's weights in the compute dtype, the activations of one batch of 8 sequences (hidden-size tensors and
    MLP-width ones, with the thresholded copies and histogram temporaries), and the greedy search's subset: its
    hidden states, the reference output, and the cached attention outputs of the tail."""
    cal, sp = recipe.calibration, recipe.sparsity
    d, inter = config.hidden_size, config.intermediate_size
    batch_tokens = min(8, cal.samples) * cal.seq_len
    batch = batch_tokens * (8 * d + 5 * inter) * b_c
    n_subset = min(cal.samples, max(1, math.ceil(sp.greedy.tokens / cal.seq_len)))
    subset_tokens = n_subset * cal.seq_len
    tail = subset_tokens * sp.greedy.last_fraction
    greedy = subset_tokens * (6 * d) * b_c + tail * (2 * 16 * d + 5 * inter) * b_c
    return params_per_layer * b_c + max(batch, greedy)
