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

Under torchrun (docs/distributed.md) every rank runs this loop on its share of the calibration sequences (strided,
teal_quant.distributed): histogram counts, the greedy search's sums of squared errors and GPTQ's Hessians are summed
over the ranks, so every rank takes the same decisions; each rank propagates its own hidden states; rank 0 alone
writes the artifact (and evaluates it) while the others wait, and every rank returns rank 0's result. Errors are
agreed on (distributed.agreement) at the checks, at each layer's read and write and at the end.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from teal_quant import __version__, distributed
from teal_quant.architecture import (
    ACTIVATION_POINTS,
    PROJECTIONS,
    build_skeleton,
    check_shapes,
    materialize_non_persistent_buffers,
    projection_shapes,
)
from teal_quant.artifact import plots
from teal_quant.artifact.card import CardFacts, base_model_license, is_repo_id, model_card
from teal_quant.artifact.format import (
    ALLOCATION_PLOT_FILE,
    CARD_FILE,
    EMBEDDING_KEY,
    RECIPE_FILE,
    REPORT_FILE,
    ArtifactWriter,
    TealQuantConfig,
    check_destination,
    layer_key_prefix,
    linear_key,
)
from teal_quant.compression.calibrate.layer import (
    LayerRunner,
    SimulatedLinear,
    allocate,
    attach_simulated,
    capture_histograms,
    predicted_sparsity,
)
from teal_quant.compression.data import check_text_files, generate_samples, random_windows, read_text, tokenize_stream
from teal_quant.compression.quantize import QUANTIZERS, HessianAccumulator, QuantSpec
from teal_quant.compression.quantize.rtn import dequantize_codes
from teal_quant.compression.recipe import GeneratedSource, Recipe, TextFilesSource, parse_size
from teal_quant.compression.sources import open_model
from teal_quant.compression.sources.base import ModelSource
from teal_quant.compression.sources.gptq import weight_format
from teal_quant.devices import resolve_dtype, select_device
from teal_quant.errors import ArtifactError, DataError, ModelSourceError
from teal_quant.kernels import pack
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


# Called on the complete artifact directory before it is moved into place; returns teal_quant.evaluate rows.
Evaluate = Callable[[Path], list[dict]]


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
    stream = tokenize_stream(tokenizer, read_text(cal.source))
    progress.update(task, total=1, completed=1)
    return random_windows(stream, cal.samples, cal.seq_len, cal.seed, tokenizer.bos_token_id)


def check_inputs(recipe: Recipe) -> None:
    """What can be checked before the model is opened besides the destination (artifact.format.check_destination):
    the calibration and eval text files exist and are readable text. Each failure is one TealQuantError."""
    if isinstance(recipe.calibration.source, TextFilesSource):
        check_text_files(recipe.calibration.source, "calibration")
    if recipe.eval is not None and isinstance(recipe.eval.source, TextFilesSource):
        check_text_files(recipe.eval.source, "eval")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def estimated_artifact_bytes(config, bits: int, group_size: int, dtype_bytes: int) -> int:
    """A rough size of the artifact from the model config alone: the seven projections of every layer at `bits`
    per weight plus a scale and a zero point (model dtype) per group, the embedding (and an untied LM head) in the
    model dtype, plus 5 % and 16 MB for norms, thresholds, tokenizer and metadata."""
    linear = config.num_hidden_layers * sum(k * n for k, n in projection_shapes(config).values())
    quantized = linear * bits / 8 + linear / (group_size if group_size > 0 else config.hidden_size) * 2 * dtype_bytes
    embedding = config.vocab_size * config.hidden_size * dtype_bytes * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return int((quantized + embedding) * 1.05) + 16 * 2**20


def check_disk_space(out: Path, needed: int) -> None:
    """The artifact is staged beside `out` and moved into place; the old one (overwrite) goes only after that."""
    where = _existing_ancestor(out.resolve().parent)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise ArtifactError(f"output '{out}': about {needed / 1e9:.2f} GB needed (estimated from the model config), "
                            f"only {free / 1e9:.2f} GB free on '{where}'")


def compress(recipe: Recipe, output_dir: str | Path | None = None, *, overwrite: bool | None = None) -> Path:
    """Run a recipe's compression and return the artifact directory."""
    return compress_recipe(recipe, output_dir, overwrite=overwrite).artifact


def compress_recipe(recipe: Recipe, output_dir: str | Path | None = None, *, overwrite: bool | None = None,
                    evaluate: Evaluate | None = None) -> Compression:
    """Compress `recipe` into one artifact. The recipe is read, never rewritten: the format of the weights is resolved
    from it and the source once (sources.gptq.weight_format). `evaluate`, when given, runs on the complete artifact
    directory before it is moved into place, so the model card is written once, with its rows."""
    t0 = time.time()
    stages: dict[str, float] = {}
    out = Path(output_dir or recipe.output.dir)
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    sp = recipe.sparsity
    levels = sp.all_levels
    default_index = levels.index(sp.default) if sp.default in levels else 0
    world = distributed.current()
    with distributed.agreement("checking the inputs", world):
        device = select_device(recipe.runtime.device, option="runtime.device")
        world = distributed.init(device)  # torchrun: join the job (no-op in one process or when joined already)
        device = world.local_device(device)
        if world.is_main:  # the output's rules before the model is opened (again, with the resolved source, below)
            check_destination(out, overwrite=overwrite, sources=_local_source(recipe.model.source))
        check_inputs(recipe)
        _check_world(recipe, world)

    with Progress() as progress:
        # distributed: rank 0 opens (downloads) the model first, then the others find it in the cache
        for opening in ((True, False) if world.distributed else (True,)):
            with distributed.agreement("opening the model", world):
                if world.is_main == opening:
                    task = progress.add_task(f"opening {recipe.model.source}", total=None)
                    src = open_model(recipe.model.source, gguf_file=recipe.model.gguf_file, revision=recipe.model.revision)
                    progress.update(task, total=1, completed=1)
        with distributed.agreement("checking the model", world):
            weights = weight_format(recipe, src)  # from_checkpoint: bits/group_size/sym/dtype are the checkpoint's
            spec = QuantSpec(bits=weights.bits, group_size=weights.group_size, sym=weights.sym)
            # None: keep the checkpoint's own codes (GPTQSource.packed), repacked bit for bit
            quantizer = None if recipe.quantization.method == "from_checkpoint" else QUANTIZERS[recipe.quantization.method]
            check_shapes(src.config, spec.group_size)
            dtype = weights.dtype
            if world.is_main:  # only rank 0 writes
                check_disk_space(out, estimated_artifact_bytes(src.config, spec.bits, spec.group_size,
                                                               torch.empty((), dtype=dtype).element_size()))
            compute_dtype = resolve_dtype(recipe.runtime.dtype, torch.float32) if recipe.runtime.dtype != "auto" else torch.float32
            tokenizer = src.tokenizer()
        stages["load"] = time.time() - t0

        t = time.time()
        with distributed.agreement("reading the calibration data", world):  # rank 0's tokens, the same on every rank
            tokens = calibration_tokens(recipe, src, tokenizer, device, compute_dtype, progress) if world.is_main else None
        tokens = distributed.broadcast_object(tokens, world)
        ranks = distributed.gather_objects(_calibrated_on(tokens, world), world)
        tokens = tokens[world.split(tokens.shape[0])]  # this rank's sequences (all of them in one process)
        stages["calibration data"] = time.time() - t

        t = time.time()
        quant = TealQuantConfig(
            bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
            quantizer="gptq" if quantizer is None else recipe.quantization.method,
            levels=levels, default=sp.default, allocation=sp.allocation, prefill=sp.prefill, criterion=sp.criterion,
            act_order=bool(getattr(src, "act_order", False)),
        )
        with distributed.agreement("creating the output", world):  # only rank 0 writes
            writer = ArtifactWriter(out, max_shard_size=parse_size(recipe.output.max_shard_size), overwrite=overwrite,
                                    sources=[src.path]) if world.is_main else None
        with writer if writer is not None else contextlib.nullcontext():
            report_layers, dense_params = _compress_layers(
                recipe, src, tokens, writer, spec, quantizer, levels, default_index, dtype, compute_dtype, device, progress,
                world,
            )
            # rank 0 writes, evaluates and commits; the others wait here for its result
            with distributed.agreement("writing the artifact", world):
                if world.is_main:
                    non_layer = src.tensors(src.non_layer_tensor_names())
                    dense_params += sum(t.numel() for t in non_layer.values())
                    writer.add({n: t.to(dtype) for n, t in non_layer.items()})
                    report = _write_metadata(writer, recipe, src, tokenizer, quant, dtype, report_layers, ranks)
                    plot = None
                    if plots.available():  # the card embeds the allocation heatmap (extra `[plots]`); without it, no image
                        plots.allocation_heatmap(report, writer.dir / ALLOCATION_PLOT_FILE)
                        plot = ALLOCATION_PLOT_FILE
                    staged = writer.finish_tensors()
                    stages["compress"] = time.time() - t
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
                            eval_rows = evaluate(staged)
                            window = recipe.eval.window if recipe.eval else None
                            dataset = eval_dataset(recipe.eval.source) if recipe.eval else None
                            card = replace(card, eval_rows=eval_rows, eval_window=window, eval_dataset=dataset)
                            if eval_rows:  # the report keeps the measured rows too (`inspect --plot` draws them)
                                writer.write_json(REPORT_FILE, {**report, "eval": {"rows": eval_rows, "window": window,
                                                                                   "dataset": dataset}})
                    finally:  # a failed evaluation still leaves the complete artifact in place (its card without the numbers)
                        writer.write_text(CARD_FILE, model_card(card))
                        path = writer.commit()

    if not world.is_main:
        return distributed.broadcast_object(None, world)  # rank 0's result, the same on every rank
    block_layers = [r["block_error"] for r in report_layers]
    return distributed.broadcast_object(Compression(
        artifact=path, levels=levels, default_level=sp.default, calibration_sparsity=calibration_sparsity,
        block_error={k: _mean_over_layers(block_layers, k, len(levels)) for k in block_layers[0]},
        artifact_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        dense_bytes=dense_params * torch.empty((), dtype=dtype).element_size(), stage_seconds=stages, eval_rows=eval_rows,
    ), world)


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


def _calibrated_on(tokens: torch.Tensor, world: distributed.World) -> dict:
    """What this rank calibrates on (calibration_report.json's `ranks`): its global sequence indices and tokens."""
    sequences = list(range(tokens.shape[0]))[world.split(tokens.shape[0])]
    return {"rank": world.rank, "sequences": sequences, "tokens": len(sequences) * int(tokens.shape[1])}


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


def _check_layer_state(src, i: int, layer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every tensor the decoder layer needs is there, with the shape its config gives: one line naming the tensor."""
    prefix = layer_key_prefix(i)
    expected = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise ModelSourceError(f"model '{src.path}': tensor '{prefix}{name}' is missing from the checkpoint")
        if tuple(state[name].shape) != shape:
            raise ModelSourceError(f"model '{src.path}': tensor '{prefix}{name}' has shape {tuple(state[name].shape)}, "
                                   f"the config gives {shape}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ModelSourceError(f"model '{src.path}': tensor '{prefix}{extra[0]}' is not part of a "
                               f"{src.config.model_type} decoder layer")


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


def _compress_layers(recipe, src, tokens, writer, spec, quantizer, levels, default_index, dtype, compute_dtype, device, progress,
                     world: distributed.World = distributed.SINGLE):
    """The layer-streaming loop; returns the per-layer report and the number of dense parameters seen.

    distributed: `tokens` are this rank's sequences, `writer` is None except on rank 0; marked below."""
    sp = recipe.sparsity
    qz = recipe.quantization
    options = qz.quantizer_options()
    aware_index = None if qz.sparsity_aware is None else min(
        range(len(levels)), key=lambda j: abs(levels[j] - qz.sparsity_aware))
    config = src.config
    config._attn_implementation = "sdpa"
    skeleton = build_skeleton(config, compute_dtype)
    materialize_non_persistent_buffers(skeleton, device)
    embed = src.tensors([EMBEDDING_KEY])[EMBEDDING_KEY]
    hidden = torch.nn.functional.embedding(tokens, embed.to(compute_dtype))  # [S, T, D] in host memory
    seq_len = hidden.shape[1]
    positions = torch.arange(seq_len, device=device)[None]
    position_embeddings = skeleton.model.rotary_emb(hidden[:1].to(device), positions)
    n_subset = max(1, math.ceil(sp.greedy.tokens / seq_len))
    n_subset = world.local_count(n_subset)  # distributed: this rank's share of the greedy search's first sequences
    report, dense_params = [], 0
    layers_task = progress.add_task("compressing layers", total=src.num_layers, plain="steps")
    for i in range(src.num_layers):
        layer = skeleton.model.layers[i]
        layer.to_empty(device=device)
        with distributed.agreement(f"reading layer {i}", world):
            state = src.layer_tensors(i)
            _check_layer_state(src, i, layer, state)
        dense_params += sum(t.numel() for t in state.values())
        layer.load_state_dict({k: v.to(compute_dtype) for k, v in state.items()})
        layer.eval()
        sims = attach_simulated(layer, sp.criterion)
        runner = LayerRunner(layer, position_embeddings)

        hists = capture_histograms(runner, sims, hidden, device)
        for hist in {id(h): h for h in hists.values()}.values():  # distributed: counts over every rank's tokens
            world.all_reduce(hist.counts)
        greedy_task = progress.add_task(f"layer {i}: {sp.allocation} allocation", total=levels[-1] or 1.0, plain=None)
        allocation = allocate(
            layer, sims, hists, hidden[:n_subset].to(device), position_embeddings, levels, method=sp.allocation,
            step=sp.greedy.step, last_fraction=sp.greedy.last_fraction,
            progress=lambda eff, _t=greedy_task: progress.update(_t, completed=eff),
            reduce=world.all_reduce if world.distributed else None,  # distributed: sums of squared errors
        )
        progress.remove_task(greedy_task)

        hessians = None
        if quantizer is not None and quantizer.needs_hessian:
            samples = world.local_count(qz.gptq.samples) if qz.gptq and qz.gptq.samples else None  # distributed
            hessians = _input_hessians(runner, sims, hidden[:samples] if samples is not None else hidden, device,
                                       None if aware_index is None else
                                       {p: allocation.projection_thresholds(p)[aware_index] for p in PROJECTIONS},
                                       world)
        quant_task = progress.add_task(f"layer {i}: {qz.method} quantization", total=len(PROJECTIONS), plain=None)
        tensors, quant_stats = {}, {}
        prefix = layer_key_prefix(i)
        for proj, module_path in PROJECTIONS.items():
            sim = sims[proj]
            name = prefix + module_path
            if quantizer is None:  # the checkpoint's weights, which sim already holds dequantized (exactly)
                tensors.update({linear_key(name, key): t for key, t in src.packed(name).items()})
            else:
                stats: dict = {}
                q, scales, zeros = quantizer(sim.weight.detach().float(), spec, hessians[proj] if hessians else None,
                                             stats=stats, **options)
                if stats:
                    quant_stats[proj] = stats
                scales, zeros = scales.to(dtype), zeros.to(dtype)
                tensors[linear_key(name, "qweight")] = pack(q, spec.bits)
                tensors[linear_key(name, "scales")] = scales
                tensors[linear_key(name, "zeros")] = zeros
                # The next layer must see this layer as it will run: dequantized weights, default-level threshold.
                w_t = dequantize_codes(q, scales, zeros, spec)  # through the rounded (model-dtype) scales and zeros
                sim.weight = torch.nn.Parameter(w_t.t().to(compute_dtype).contiguous(), requires_grad=False)
            progress.advance(quant_task)
            tensors[linear_key(name, "thresholds")] = torch.tensor(allocation.projection_thresholds(proj), dtype=torch.float32)
            if sim.channel_scale is not None:  # weight_aware: norms of the float weight's input columns
                tensors[linear_key(name, "channel_scale")] = sim.channel_scale.to(torch.float32)
            if sim.bias is not None:
                tensors[linear_key(name, "bias")] = sim.bias.detach().to(dtype)
            sim.threshold = allocation.projection_thresholds(proj)[default_index]
        progress.remove_task(quant_task)
        del hessians
        projection_keys = {f"{p}.weight" for p in PROJECTIONS.values()} | {f"{p}.bias" for p in PROJECTIONS.values()}
        for key, t in state.items():
            if key not in projection_keys:
                tensors[prefix + key] = t.to(dtype)
        with distributed.agreement(f"writing layer {i}", world):
            if writer is not None:  # distributed: rank 0 writes
                writer.add(tensors)

        hidden = runner(hidden, device)
        sizes = {p: s.weight.numel() for p, s in sims.items()}
        report.append({
            "layer": i,
            "levels": levels,
            "sparsity": [{p: round(s, 6) for p, s in a.items()} for a in allocation.sparsities],
            "thresholds": {p: allocation.projection_thresholds(p) for p in PROJECTIONS},
            "calibration_sparsity": predicted_sparsity(allocation, hists, sizes),
            "block_error": allocation.errors,
            "histograms": _compact_histograms(hists),
            **({"quantizer": quant_stats} if quant_stats else {}),
        })
        layer.to("meta")
        del sims, runner, state
        progress.advance(layers_task)
    return report, dense_params


def _compact_histograms(hists: dict) -> list[dict]:
    """Each distinct activation-score histogram of a layer, compacted (256 log bins), with the projections it feeds
    (q, k, v share one under the magnitude criterion)."""
    groups: list[tuple[object, list[str]]] = []
    for proj in PROJECTIONS:
        for h, projs in groups:
            if h is hists[proj]:
                projs.append(proj)
                break
        else:
            groups.append((hists[proj], [proj]))
    return [{"projections": projs, **h.compact()} for h, projs in groups]


def _input_hessians(runner: LayerRunner, sims: dict[str, SimulatedLinear], hidden: torch.Tensor, device,
                    thresholds: dict[str, float] | None,
                    world: distributed.World = distributed.SINGLE) -> dict[str, torch.Tensor]:
    """Each projection's input Hessian 2/n Σ x xᵀ from one pass of the float layer over `hidden`.

    thresholds None: dense inputs, one Hessian per activation point (q/k/v read the same input, and gate/up).
    Otherwise (sparsity-aware GPTQ) the layer runs with every projection at its threshold, as it will decode at
    that level, and each projection gets the Hessian of its own thresholded input (sim.sparsify).
    """
    accumulators: dict[str, HessianAccumulator] = {}
    try:
        if thresholds is None:
            for projs in ACTIVATION_POINTS.values():
                first = sims[projs[0]]
                acc = HessianAccumulator(first.weight.shape[1], device)
                first.observer = acc.update
                accumulators.update({p: acc for p in projs})
        else:
            for proj, sim in sims.items():
                sim.threshold = thresholds[proj]
                acc = accumulators[proj] = HessianAccumulator(sim.weight.shape[1], device)
                sim.observer = lambda x, _sim=sim, _acc=acc: _acc.update(_sim.sparsify(x))
        runner(hidden, device)
    finally:
        for sim in sims.values():
            sim.observer, sim.threshold = None, 0.0
    if world.distributed:  # H = 2/n sum x x^T over every rank's tokens: sum n_r * H_r and n_r, then divide
        for acc in {id(a): a for a in accumulators.values()}.values():
            count = torch.tensor([float(acc.count)], dtype=torch.float64)
            acc.hessian.mul_(acc.count)
            world.all_reduce(acc.hessian)
            world.all_reduce(count)
            acc.count = int(count.item())
            acc.hessian.div_(max(acc.count, 1))
    return {p: acc.hessian for p, acc in accumulators.items()}


def _write_metadata(writer: ArtifactWriter, recipe: Recipe, src: ModelSource, tokenizer, quant, dtype, report_layers,
                    ranks: list[dict]) -> dict:
    """Everything but the tensors and the model card: config (with the resolved quantization_config), generation
    config, tokenizer, the recipe as it was read, and the calibration report (with the processes that calibrated:
    `world_size` and, per rank, the sequences and tokens it calibrated on)."""
    from transformers import GenerationConfig

    config = src.config
    config.dtype = dtype
    config.quantization_config = quant.to_dict()
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
