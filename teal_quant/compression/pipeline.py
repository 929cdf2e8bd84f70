"""compress(recipe): stream the model one decoder layer at a time and write one artifact.

Per layer (llm-compressor's sequential pipeline, with TEAL in it):
  1. capture histograms of the activation scores on the calibration hidden states: |x| of the four
     activation points (magnitude criterion) or |x| * channel_scale of each projection (weight_aware);
  2. allocate sparsity between the seven projections for every level (greedy or uniform), measuring
     the block output error against the dense float layer;
  3. quantize the projections (the recipe's quantizer) and pack them; a Hessian-based quantizer (GPTQ) first
     runs the float layer once more to accumulate each projection's input Hessian;
  4. propagate: run the compressed layer (dequantized weights, default-level thresholds on every token)
     so layer i+1 is calibrated on the activations it will really see.
Only the current layer's float weights are on the compute device; hidden states wait in host memory.

Under torchrun (docs/distributed.md) every rank runs the layer loop on its share of the calibration sequences
(strided, teal_quant.distributed): histogram counts, the greedy search's sums of squared errors and GPTQ's Hessians
are summed over the ranks (the loop's reducer is the World), so every rank takes the same decisions; each rank
propagates and checkpoints its own hidden states; rank 0 alone writes the artifact (and evaluates it) while the
others wait, and every rank returns rank 0's result. Errors are agreed on (distributed.agreement) at the checks, at
each layer's write and checkpoint and at the end. The places are marked `distributed:`.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from teal_quant import __version__, distributed
from teal_quant.architecture import check_shapes
from teal_quant.artifact import plots
from teal_quant.artifact.card import CardFacts, base_model_license, is_repo_id, model_card
from teal_quant.artifact.format import (
    ALLOCATION_PLOT_FILE,
    CARD_FILE,
    EMBEDDING_KEY,
    HEAD_MODULE,
    LM_HEAD_KEY,
    RECIPE_FILE,
    REPORT_FILE,
    RESUME_DIR,
    ArtifactWriter,
    TealQuantConfig,
    check_destination,
)
from teal_quant.compression.data import (
    POOL_FACTOR,
    calibration_stream,
    check_text_files,
    generate_samples,
    random_windows,
)
from teal_quant.compression.head import check_head_shape, quantized_head
from teal_quant.compression.head import head_bits as head_format
from teal_quant.compression.hidden import HiddenStates
from teal_quant.compression.plan import existing_ancestor, plan_run
from teal_quant.compression.quantize import QUANTIZERS, QuantSpec
from teal_quant.compression.quantize.layer import MethodQuantizer
from teal_quant.compression.quantize.rtn import QuantSpec as RtnSpec
from teal_quant.compression.recipe import GeneratedSource, Recipe, TextFilesSource, parse_size
from teal_quant.compression.sources import open_model
from teal_quant.compression.sources.base import ModelSource
from teal_quant.compression.sources.gptq import weight_format
from teal_quant.compression.stream import (
    SINGLE_PROCESS,
    LayerQuantizer,
    Peaks,
    Reducer,
    StreamSettings,
    compress_layers,
)
from teal_quant.devices import resolve_dtype, select_device
from teal_quant.errors import ArtifactError, DataError, TealQuantError
from teal_quant.progress import Progress


@dataclass
class Compression:
    """What a run of the pipeline produced: the artifact and the numbers its summary shows (nothing is printed)."""

    artifact: Path
    levels: list[float]
    default_level: float
    calibration_sparsity: list[float]  # per level: size-weighted, mean over layers
    block_error: dict[str, list[float]]  # per kind of error, per level: mean over layers
    artifact_bytes: int
    dense_bytes: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    eval_rows: list[dict] = field(default_factory=list)  # what the `evaluate` hook returned (and the card shows)
    layer_seconds: list[float] = field(default_factory=list)  # per decoder layer, writing and checkpoint included
    peak_host_bytes: int | None = None  # the process's peak resident set (ru_maxrss)
    peak_gpu_bytes: int | None = None  # torch's peak allocated GPU memory (None on the CPU)
    resumed_from_layer: int = 0  # --resume: the layers an interrupted run had finished


# Called on the complete artifact directory before it is moved into place, with the run's open base model (its
# dense baseline then reads no file again: a GGUF source costs half a minute to parse); returns teal_quant.evaluate rows.
Evaluate = Callable[[Path, ModelSource], list[dict]]


def quantization_summary(recipe: Recipe) -> dict:
    """How the weights were quantized: the method and its options (calibration report and model card)."""
    qz = recipe.quantization
    out = {"method": qz.method, **qz.quantizer_options()}
    if qz.gptq is not None:
        out["samples"] = qz.gptq.samples or recipe.calibration.samples
        out["sparsity_aware"] = qz.sparsity_aware
    return out


def calibration_tokens(recipe: Recipe, src: ModelSource, tokenizer, device, dtype, progress: Progress) -> torch.Tensor:
    cal = recipe.calibration
    if isinstance(cal.source, GeneratedSource):
        task = progress.add_task("generating calibration text", total=cal.samples, plain="steps")
        model = src.load_full_model(dtype, device)
        tokens = generate_samples(model, tokenizer, cal.source, cal.samples, cal.seq_len, cal.seed, device,
                                  progress=lambda n: progress.advance(task, n))
        del model
        return tokens
    task = progress.add_task("tokenizing calibration text", total=None)
    stream = calibration_stream(tokenizer, cal.source, POOL_FACTOR * cal.samples * cal.seq_len)
    progress.update(task, total=1, completed=1)
    return random_windows(stream, cal.samples, cal.seq_len, cal.seed, tokenizer.bos_token_id)


def check_inputs(recipe: Recipe) -> None:
    """What can be checked before the model is opened besides the destination (artifact.format.check_destination):
    the calibration and eval text files exist and are readable text. Each failure is one TealQuantError."""
    if isinstance(recipe.calibration.source, TextFilesSource):
        check_text_files(recipe.calibration.source, "calibration")
    if recipe.eval is not None and isinstance(recipe.eval.source, TextFilesSource):
        check_text_files(recipe.eval.source, "eval")


def check_disk_space(out: Path, needed: int) -> None:
    """The artifact is staged beside `out` and moved into place; the old one (overwrite) goes only after that."""
    where = existing_ancestor(out.resolve().parent)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise ArtifactError(f"output '{out}': about {needed / 1e9:.2f} GB needed (estimated from the model config), "
                            f"only {free / 1e9:.2f} GB free on '{where}'")


def compress(recipe: Recipe, output_dir: str | Path | None = None, *, overwrite: bool | None = None,
             resume: bool = False) -> Path:
    """Run a recipe's compression and return the artifact directory."""
    return compress_recipe(recipe, output_dir, overwrite=overwrite, resume=resume).artifact


def compress_recipe(recipe: Recipe, output_dir: str | Path | None = None, *, overwrite: bool | None = None,
                    evaluate: Evaluate | None = None, resume: bool = False,
                    reducer: Reducer = SINGLE_PROCESS) -> Compression:
    """Compress `recipe` into one artifact. The recipe is read, never rewritten: the format of the weights is resolved
    from it and the source once (sources.gptq.weight_format). `evaluate`, when given, runs on the complete artifact
    directory before it is moved into place, so the model card is written once, with its rows.

    Every finished layer is checkpointed in the staging folder (its packed tensors and the hidden states entering the
    next layer, with a fingerprint of the run); a run that fails or is stopped keeps them, and `resume=True`
    continues from the last finished layer, giving the same artifact bytes as an uninterrupted run."""
    t0 = time.time()
    stages: dict[str, float] = {}
    out = Path(output_dir or recipe.output.dir)
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    sp = recipe.sparsity
    levels = sp.all_levels
    world = distributed.current()
    with distributed.agreement("checking the inputs", world):  # distributed: an error on any rank stops every rank
        device = select_device(recipe.runtime.device, option="runtime.device")
        world = distributed.init(device)  # distributed: join torchrun's job (nothing in one process)
        device = world.local_device(device)
        if world.is_main:  # the output's rules before the model is opened (again, with the resolved source, below)
            check_destination(out, overwrite=overwrite, sources=_local_source(recipe.model.source))
        check_inputs(recipe)
        _check_world(recipe, world)
    if world.distributed and reducer is SINGLE_PROCESS:
        reducer = world  # distributed: the layer loop sums its statistics over the ranks

    with Progress() as progress:
        # distributed: rank 0 opens (downloads) the model first, then the others find it in the cache; only rank 0
        # deletes downloaded shards (keep_download false)
        for opening in ((True, False) if world.distributed else (True,)):
            with distributed.agreement("opening the model", world):
                if world.is_main == opening:
                    task = progress.add_task(f"opening {recipe.model.source}", total=None)
                    src = open_model(recipe.model.source, gguf_file=recipe.model.gguf_file, revision=recipe.model.revision,
                                     keep_download=recipe.model.keep_download or not world.is_main)
                    progress.update(task, total=1, completed=1)
        with distributed.agreement("checking the model", world):
            weights = weight_format(recipe, src)  # from_checkpoint: bits/group_size/sym/dtype are the checkpoint's
            spec = QuantSpec(bits=weights.bits, group_size=weights.group_size, sym=weights.sym)
            check_shapes(src.config, spec.group_size)
            head_bits = head_format(recipe.quantization.lm_head)
            check_head_shape(src.config, head_bits)
            dtype = weights.dtype
            quantizer = layer_quantizer(recipe, src, spec, dtype)
            compute_dtype = resolve_dtype(recipe.runtime.dtype, torch.float32) if recipe.runtime.dtype != "auto" else torch.float32
            hidden_dtype = compute_dtype if recipe.runtime.hidden_dtype == "auto" else resolve_dtype(recipe.runtime.hidden_dtype, None)
            if not resume and world.is_main:  # disk, host and GPU memory, from the config (one process's plan)
                plan_run(recipe, out, src=src, timing=False).check()
            tokenizer = src.tokenizer()
            fingerprint = {**run_fingerprint(recipe, src), "number of processes": str(world.size)}
        stages["load"] = time.time() - t0

        quant = TealQuantConfig(
            bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
            quantizer="gptq" if recipe.quantization.method == "from_checkpoint" else recipe.quantization.method,
            levels=levels, default=sp.default, allocation=sp.allocation, prefill=sp.prefill, criterion=sp.criterion,
            act_order=bool(getattr(src, "act_order", False)),
            lm_head_bits=head_bits, lm_head_group_size=None if head_bits is None else spec.group_size,
            modules_to_not_convert=[] if head_bits is not None else [HEAD_MODULE],
        )
        settings = stream_settings(recipe, levels, compute_dtype, dtype, device)
        with distributed.agreement("creating the output", world):  # distributed: only rank 0 writes
            writer = ArtifactWriter(out, max_shard_size=parse_size(recipe.output.max_shard_size), overwrite=overwrite,
                                    sources=[src.path], fingerprint=fingerprint, resume=resume) if world.is_main else None
            kept = (writer.resumed or {}, str(writer.dir)) if writer is not None else None
        state, staging = distributed.broadcast_object(kept, world)  # distributed: rank 0's resume state and folder
        # distributed: rank r > 0 keeps its own hidden states in the staging folder's RESUME_DIR/rank-r
        resume_file = writer.resume_file if writer is not None else _rank_resume_file(Path(staging), world.rank)
        ranks = _calibrated_on(recipe, world)
        path = None
        try:
            with writer if writer is not None else contextlib.nullcontext(), _disk_full_is_an_error(out):
                t = time.time()
                if state:
                    report_layers, dense_params = list(state["report"]), int(state["dense_params"])
                    with distributed.agreement("reading the checkpoint", world):
                        hidden = _restore_hidden(state, resume_file, recipe, hidden_dtype, world)
                    if src.hub is not None and world.is_main:  # shards the interrupted run downloaded: ours to delete
                        src.hub.adopt(state.get("hub_downloaded") or [])
                else:
                    with distributed.agreement("reading the calibration data", world):  # rank 0's tokens, everywhere
                        tokens = calibration_tokens(recipe, src, tokenizer, device, compute_dtype, progress) \
                            if world.is_main else None
                    tokens = distributed.broadcast_object(tokens, world)
                    tokens = tokens[world.split(tokens.shape[0])]  # distributed: this rank's sequences (all in one)
                    hidden = _new_hidden(recipe, resume_file, (*tokens.shape, src.config.hidden_size), hidden_dtype)
                    with distributed.agreement("embedding the calibration tokens", world):
                        dense_params = embed_tokens(src, tokens, hidden, writer, dtype)
                    del tokens
                    report_layers = []
                stages["calibration data"] = time.time() - t

                t = time.time()
                if not state.get("non_layer_done"):
                    dense_params = _compress_all_layers(src, quantizer, hidden, settings, writer, report_layers,
                                                        dense_params, progress, reducer, world, resume_file)
                    with distributed.agreement("writing the last tensors", world):
                        if writer is not None:
                            non_layer = src.tensors([n for n in src.non_layer_tensor_names() if n != EMBEDDING_KEY])
                            dense_params += sum(t.numel() for t in non_layer.values())
                            if head_bits is not None:  # the head's own packed tensors (tied: a quantized embedding copy)
                                head = non_layer.pop(LM_HEAD_KEY, None)
                                if head is None:
                                    head = src.tensors([EMBEDDING_KEY])[EMBEDDING_KEY]
                                writer.add(quantized_head(head, RtnSpec(bits=head_bits, group_size=spec.group_size,
                                                                        sym=spec.sym), dtype))
                                del head
                            writer.add({n: t.to(dtype) for n, t in non_layer.items()})
                            del non_layer
                            writer.checkpoint(_progress_state(report_layers, dense_params, hidden, src,
                                                              non_layer_done=True),
                                              summary=f"all {src.num_layers} layers", files=_hidden_files(hidden))
                            src.release_remaining()
                hidden.close()
                if world.distributed:  # every rank's peak memory, in the report (one process: the layers' peaks)
                    for row, rank_peaks in zip(ranks, distributed.gather_objects(Peaks(device).snapshot(), world)):
                        row["peaks"] = rank_peaks
                # distributed: rank 0 writes, evaluates and commits; the others wait here for its outcome
                with distributed.agreement("writing the artifact", world):
                    if writer is not None:
                        path, eval_rows, calibration_sparsity = _finish_artifact(
                            writer, recipe, src, tokenizer, quant, dtype, report_layers, ranks, progress, evaluate)
                        stages["compress"] = time.time() - t
        except BaseException as e:
            if writer is not None:
                _note_kept_work(e, writer)
            raise

    if writer is None:
        return distributed.broadcast_object(None, world)  # distributed: rank 0's result, on every rank
    block_layers = [r["block_error"] for r in report_layers]
    peaks = Peaks(device).snapshot()
    return distributed.broadcast_object(Compression(
        artifact=path, levels=levels, default_level=sp.default, calibration_sparsity=calibration_sparsity,
        block_error={k: _mean_over_layers(block_layers, k, len(levels)) for k in block_layers[0]},
        artifact_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        dense_bytes=dense_params * torch.empty((), dtype=dtype).element_size(), stage_seconds=stages, eval_rows=eval_rows,
        layer_seconds=[r.get("seconds", 0.0) for r in report_layers], peak_host_bytes=peaks["host_rss_bytes"],
        peak_gpu_bytes=peaks.get("gpu_allocated_bytes"), resumed_from_layer=int(state.get("layers_done", 0)),
    ), world)


def _finish_artifact(writer: ArtifactWriter, recipe: Recipe, src: ModelSource, tokenizer, quant: TealQuantConfig,
                     dtype: torch.dtype, report_layers: list[dict], ranks: list[dict], progress: Progress,
                     evaluate: Evaluate | None) -> tuple[Path, list[dict], list[float]]:
    """Metadata, allocation plot, the final shard names, the evaluation (when asked) and the card; then the rename.
    Returns (artifact path, eval rows, calibration sparsity per level)."""
    levels = quant.levels
    report = _write_metadata(writer, recipe, src, tokenizer, quant, dtype, report_layers, ranks)
    plot = None
    if plots.available():  # the card embeds the allocation heatmap (extra `[plots]`); without it, no image
        plots.allocation_heatmap(report, writer.dir / ALLOCATION_PLOT_FILE)
        plot = ALLOCATION_PLOT_FILE
    staged = writer.finish_tensors()
    progress.stop()  # the evaluation shows its own progress

    calibration_sparsity = _mean_over_layers(report_layers, "calibration_sparsity", len(levels))
    card = CardFacts(source=recipe.model.source, base_model=hub_base_model(recipe.model), name=recipe.name,
                     quant=quant, quantization=quantization_summary(recipe),
                     calibration_sparsity=calibration_sparsity,
                     license=base_model_license(src.path, src.gguf_file),
                     repo_id=recipe.hub.repo_id if recipe.hub else None, allocation_plot=plot)
    eval_rows: list[dict] = []
    try:
        if evaluate is not None:
            eval_rows = evaluate(staged, src)
            window = recipe.eval.window if recipe.eval else None
            dataset = eval_dataset(recipe.eval.source) if recipe.eval else None
            card = replace(card, eval_rows=eval_rows, eval_window=window, eval_dataset=dataset)
            if eval_rows:  # the report keeps the measured rows too (`inspect --plot` draws them)
                writer.write_json(REPORT_FILE, {**report, "eval": {"rows": eval_rows, "window": window,
                                                                   "dataset": dataset}})
    finally:  # a failed evaluation still leaves the complete artifact in place (its card without the numbers)
        writer.write_text(CARD_FILE, model_card(card))
        path = writer.commit()
    return path, eval_rows, calibration_sparsity


def _check_world(recipe: Recipe, world: distributed.World) -> None:
    """Distributed: every rank needs at least one calibration sequence (and, with GPTQ, one of its samples)."""
    if not world.distributed:
        return
    samples = recipe.calibration.samples
    if samples < world.size:
        raise DataError(f"calibration.samples {samples} is fewer than the {world.size} processes of this job: each "
                        "rank calibrates on its own sequences (raise calibration.samples or use fewer processes)")
    gptq = recipe.quantization.gptq
    if gptq is not None and gptq.samples and gptq.samples < world.size:
        raise DataError(f"quantization.gptq.samples {gptq.samples} is fewer than the {world.size} processes of this "
                        "job: each rank accumulates the Hessians of its own samples")


def _calibrated_on(recipe: Recipe, world: distributed.World) -> list[dict]:
    """Who calibrated on what (calibration_report.json's `ranks`): each rank's global sequence indices and tokens."""
    samples, seq_len = recipe.calibration.samples, recipe.calibration.seq_len
    rows = []
    for rank in range(world.size):
        sequences = list(range(samples))[distributed.World(rank=rank, size=world.size).split(samples)]
        rows.append({"rank": rank, "sequences": sequences, "tokens": len(sequences) * seq_len})
    return rows


def _rank_resume_file(staging: Path, rank: int):
    """distributed: `ArtifactWriter.resume_file` for rank `rank` > 0: its files in RESUME_DIR/rank-<rank>."""
    def resume_file(name: str) -> Path:
        folder = staging / RESUME_DIR / f"rank-{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    return resume_file


def _compress_all_layers(src: ModelSource, quantizer: LayerQuantizer, hidden: HiddenStates, settings: StreamSettings,
                         writer: ArtifactWriter | None, report_layers: list[dict], dense_params: int, progress: Progress,
                         reducer: Reducer, world: distributed.World = distributed.SINGLE,
                         resume_file: Callable[[str], Path] | None = None) -> int:
    """The layer loop from the first unfinished layer: each layer's tensors into the writer, then a checkpoint (its
    tensors spilled, the hidden states entering the next layer, the report so far); one plain line per layer in a log.

    distributed: `writer` is None except on rank 0; every rank saves its own hidden states (`resume_file`), then rank 0
    checkpoints, so a checkpoint never names a layer whose hidden states some rank has not saved."""
    resume_file = resume_file or writer.resume_file
    levels, default_index = settings.levels, settings.default_index
    first = len(report_layers)
    layers_task = progress.add_task("compressing layers", total=src.num_layers, plain="steps", completed=first)
    greedy: dict[int, object] = {}

    def on_stage(i: int, name: str) -> None:
        if name == "allocate":
            greedy[i] = progress.add_task(f"layer {i}: {settings.allocation} allocation", total=levels[-1] or 1.0,
                                          plain=None)
        elif i in greedy:
            progress.remove_task(greedy.pop(i))

    for result in compress_layers(src.config, src, quantizer, hidden, settings, first_layer=first, reducer=reducer,
                                  on_stage=on_stage,
                                  greedy_progress=lambda i, eff: progress.update(greedy[i], completed=eff)):
        t = time.perf_counter()
        i = result.index
        with distributed.agreement(f"writing layer {i}", world):  # distributed: rank 0 writes, every rank saves
            if writer is not None:
                writer.add(result.tensors)
            result.tensors = {}
            dense_params += result.dense_params
            report_layers.append(result.report)
            if hidden.on_disk_mode:
                files = _hidden_files(hidden)
            else:
                files = [f"hidden-{i % 2}.bin"]
                hidden.save(resume_file(files[0]))
        write = time.perf_counter() - t
        result.report["stage_seconds"]["write"] = round(write, 4)
        result.report["seconds"] = round(result.report["seconds"] + write, 3)
        with distributed.agreement(f"checkpointing layer {i}", world):
            if writer is not None:
                writer.checkpoint(_progress_state(report_layers, dense_params, hidden, src, files=files),
                                  summary=f"{i + 1} of {src.num_layers} finished layers", files=files)
        errors = result.report["block_error"].get(settings.allocation) or next(iter(result.report["block_error"].values()))
        peaks = result.report["peaks"]
        gpu = f", GPU {peaks['gpu_allocated_bytes'] / 1e9:.1f} GB" if "gpu_allocated_bytes" in peaks else ""
        progress.advance(layers_task, note=f"layer {i}: {result.report['seconds']:.1f}s, block error "
                                           f"{errors[default_index]:.4f} at {levels[default_index]:g}, peak host "
                                           f"{peaks['host_rss_bytes'] / 1e9:.1f} GB{gpu}")
    return dense_params


def _progress_state(report_layers: list[dict], dense_params: int, hidden: HiddenStates, src: ModelSource, *,
                    files: list[str] | None = None, non_layer_done: bool = False) -> dict:
    """What --resume needs besides the writer's tensors: the layers done (their report rows), the dense parameter
    count, where the hidden states entering the next layer are, and the Hub shards this run downloaded."""
    hidden_state = {"shape": list(hidden.shape), "dtype": str(hidden.dtype).removeprefix("torch."),
                    "storage": "disk" if hidden.on_disk_mode else "memory"}
    if hidden.on_disk_mode:
        hidden_state["current"] = hidden.current
    elif files:
        hidden_state["file"] = files[0]
    return {"layers_done": len(report_layers), "dense_params": dense_params, "report": report_layers,
            "hidden": hidden_state, "non_layer_done": non_layer_done,
            "hub_downloaded": list(src.hub.downloaded) if src.hub is not None else []}


def _hidden_files(hidden: HiddenStates) -> list[str]:
    return [f.name for f in hidden.files] if hidden.on_disk_mode else []


def _new_hidden(recipe: Recipe, resume_file: Callable[[str], Path], shape: tuple[int, int, int],
                dtype: torch.dtype) -> HiddenStates:
    """`resume_file`: ArtifactWriter.resume_file (distributed: this rank's, _rank_resume_file)."""
    if recipe.runtime.hidden_storage == "disk":
        return HiddenStates.on_disk(resume_file("hidden-a.bin").parent, shape, dtype)
    return HiddenStates.in_memory(shape, dtype)


def _restore_hidden(state: dict, resume_file: Callable[[str], Path], recipe: Recipe, dtype: torch.dtype,
                    world: distributed.World = distributed.SINGLE) -> HiddenStates:
    """The hidden states entering the first unfinished layer, as the interrupted run checkpointed them."""
    saved = state["hidden"]
    shape = tuple(int(x) for x in saved["shape"])
    if world.distributed:  # distributed: the state is rank 0's; this rank holds its own share of the sequences
        shape = (world.local_count(recipe.calibration.samples), *shape[1:])
    if saved["dtype"] != str(dtype).removeprefix("torch.") or saved["storage"] != recipe.runtime.hidden_storage:
        raise ArtifactError(f"--resume: the interrupted run kept its hidden states as {saved['storage']} "
                            f"{saved['dtype']}; this recipe asks for {recipe.runtime.hidden_storage} {dtype}")
    if saved["storage"] == "disk":
        return HiddenStates.on_disk(resume_file("hidden-a.bin").parent, shape, dtype, current=int(saved["current"]))
    hidden = HiddenStates.in_memory(shape, dtype)
    if not state.get("non_layer_done"):
        hidden.load(resume_file(saved["file"]))
    return hidden


def embed_tokens(src: ModelSource, tokens: torch.Tensor, hidden: HiddenStates, writer: ArtifactWriter | None,
                 dtype: torch.dtype) -> int:
    """Fill `hidden` with the embeddings of the calibration tokens (the input of layer 0), batch by batch; the
    embedding goes into the artifact right away (distributed: rank 0's writer; `writer` None elsewhere) and is freed.
    Returns its parameter count."""
    embed = src.tensors([EMBEDDING_KEY])[EMBEDDING_KEY]
    for start in range(0, tokens.shape[0], 8):
        hidden.write_input(start, embed[tokens[start:start + 8]])
    if writer is not None:
        writer.add({EMBEDDING_KEY: embed.to(dtype)})
    n = embed.numel()
    del embed
    src.release(-1)  # a Hub shard that held only the embedding (keep_download false)
    return n


def run_fingerprint(recipe: Recipe, src: ModelSource) -> dict[str, str]:
    """What must not change between a run and its --resume: the recipe (less output.overwrite, eval and hub, which
    do not touch the tensors), the source's files (config, index, shard names and sizes) and the code (teal-quant's
    and the kernels' sources, torch, transformers and safetensors versions)."""
    import hashlib
    import importlib.metadata
    import importlib.util
    import json

    data = recipe.model_dump(mode="json")
    data["output"].pop("overwrite", None)
    data.pop("eval", None)
    data.pop("hub", None)
    recipe_hash = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "quantize_config.json"):
        f = src.path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    files = sorted(set(src._index.values()) | ({src.path / src.gguf_file} if src.gguf_file else set()))
    for f in files:  # a Hub model's shards come and go (keep_download): its index and the revision name them
        size = f.stat().st_size if src.hub is None else src.hub.revision
        h.update(f"{f.name}:{size}".encode())
    source_hash = h.hexdigest()

    code = hashlib.sha256()
    roots = {Path(__file__).resolve().parents[1]}
    spec = importlib.util.find_spec("teal_quant.kernels")
    if spec is not None and spec.submodule_search_locations:
        roots |= {Path(p).resolve() for p in spec.submodule_search_locations}
    seen = set()
    for root in sorted(roots):
        for f in sorted(root.rglob("*.py")):
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            code.update(f.name.encode() + b"\0" + f.read_bytes())
    for package in ("torch", "transformers", "safetensors"):
        try:
            code.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"recipe": recipe_hash, "model source": source_hash, "code version": code.hexdigest()}


def _is_disk_full(error: BaseException) -> bool:
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "StorageFull" in str(e):  # safetensors' Rust I/O errors
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _disk_full_is_an_error(out: Path):
    """A full disk while writing is the user's to fix: one ArtifactError line (exit 2), not an internal error."""
    try:
        yield
    except Exception as e:
        if not _is_disk_full(e):
            raise
        where = existing_ancestor(out.parent)
        free = shutil.disk_usage(where).free
        raise ArtifactError(f"output '{out}': the disk is full ({free / 1e9:.2f} GB free on '{where}')") from None


def _note_kept_work(error: BaseException, writer: ArtifactWriter) -> None:
    """An interrupted run kept its finished layers: say where in the error's one line (the CLI prints `resume_note`;
    a TealQuantError's own message carries it for API callers)."""
    note = writer.kept_note()
    if not note:
        return
    error.resume_note = note
    if isinstance(error, TealQuantError) and error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}; {note}", *error.args[1:])


def layer_quantizer(recipe: Recipe, src: ModelSource, spec: QuantSpec, dtype: torch.dtype) -> LayerQuantizer:
    """The recipe's method as the layer loop's quantizer: a GPTQ checkpoint's own codes (from_checkpoint), else the
    QUANTIZERS table's entry."""
    qz = recipe.quantization
    if qz.method == "from_checkpoint":
        return src.quantizer()
    return MethodQuantizer(QUANTIZERS[qz.method], spec, dtype, options=qz.quantizer_options(),
                           hessian_samples=qz.gptq.samples if qz.gptq else None,
                           sparsity_aware_level=qz.sparsity_aware)


def stream_settings(recipe: Recipe, levels: list[float], compute_dtype: torch.dtype, dtype: torch.dtype,
                    device: torch.device) -> StreamSettings:
    sp = recipe.sparsity
    return StreamSettings(levels=levels, default_level=sp.default, allocation=sp.allocation, step=sp.greedy.step,
                          greedy_tokens=sp.greedy.tokens, last_fraction=sp.greedy.last_fraction, search=sp.greedy.search,
                          compute_dtype=compute_dtype, storage_dtype=dtype, device=device, criterion=sp.criterion)


def _local_source(source: str) -> list[Path]:
    """The model's folder when it is already on this machine (a Hub id is resolved only when the model is opened)."""
    from teal_quant.compression.sources.base import PACKAGE_PREFIX, resolve_local_path

    if source.startswith(PACKAGE_PREFIX):
        try:
            return [resolve_local_path(source)]
        except Exception:
            return []
    try:
        path = Path(source).expanduser()
        return [path] if path.exists() else []
    except (OSError, ValueError):  # a name the file system cannot hold: open_model says so in one line
        return []


def hub_base_model(model) -> str | None:
    """The card's `base_model`: the recipe's model.base_model, else the source when it is a Hub repo id (not
    `package:NAME`, not an existing local path); None otherwise (the Hub rejects anything but a repo id)."""
    if model.base_model:
        return model.base_model
    source = model.source
    if _local_source(source) or not is_repo_id(source):
        return None
    return source


def eval_dataset(source) -> dict:
    """What the eval text is, for the card's model-index: an HF dataset by name, else the text files' names."""
    if source.kind == "hf_dataset":
        return {"type": source.name, "name": source.name + (f" ({source.config})" if source.config else ""),
                "config": source.config, "split": source.split}
    if source.kind == "text_files":
        return {"type": "text", "name": ", ".join(Path(p).name for p in source.paths)}
    return {"type": "generated", "name": "text generated by the base model"}


def _mean_over_layers(rows: list[dict], key: str, n_levels: int) -> list[float]:
    return [sum(r[key][j] for r in rows) / len(rows) for j in range(n_levels)]


def _write_metadata(writer: ArtifactWriter, recipe: Recipe, src: ModelSource, tokenizer, quant, dtype, report_layers,
                    ranks: list[dict]) -> dict:
    """Everything but the tensors and the model card: config (with the resolved quantization_config), generation
    config, tokenizer, the recipe as it was read, and the calibration report (with the processes that calibrated:
    `world_size` and, per rank, the sequences and tokens it calibrated on and its peak memory)."""
    from transformers import GenerationConfig

    config = src.config
    config.dtype = dtype
    config.quantization_config = quant.to_dict()
    if quant.head_quantized:  # the head has tensors of its own now (the embedding stays float)
        config.tie_word_embeddings = False
    config.save_pretrained(writer.dir)
    try:
        generation = GenerationConfig.from_pretrained(src.path)
    except (OSError, ValueError):
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(writer.dir)
    tokenizer.save_pretrained(writer.dir)
    writer.write_text(RECIPE_FILE, recipe.to_yaml())
    report = {"teal_quant_version": __version__, "levels": quant.levels, "quantization": quantization_summary(recipe),
              "world_size": len(ranks), "ranks": ranks, "layers": report_layers}
    writer.write_json(REPORT_FILE, report)
    return report
