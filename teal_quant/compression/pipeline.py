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
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from teal_quant import __version__
from teal_quant.architecture import check_shapes, projection_shapes
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
)
from teal_quant.compression.data import check_text_files, generate_samples, random_windows, read_text, tokenize_stream
from teal_quant.compression.hidden import HiddenStates
from teal_quant.compression.quantize import QUANTIZERS, QuantSpec
from teal_quant.compression.quantize.layer import MethodQuantizer
from teal_quant.compression.recipe import GeneratedSource, Recipe, TextFilesSource, parse_size
from teal_quant.compression.sources import open_model
from teal_quant.compression.sources.base import ModelSource
from teal_quant.compression.sources.gptq import weight_format
from teal_quant.compression.stream import LayerQuantizer, StreamSettings, compress_layers
from teal_quant.devices import resolve_dtype, select_device
from teal_quant.errors import ArtifactError
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
    device = select_device(recipe.runtime.device, option="runtime.device")
    sp = recipe.sparsity
    levels = sp.all_levels
    # The output's rules before the model is opened or calibration starts (again, with the resolved source, below)
    check_destination(out, overwrite=overwrite, sources=_local_source(recipe.model.source))

    check_inputs(recipe)

    with Progress() as progress:
        task = progress.add_task(f"opening {recipe.model.source}", total=None)
        src = open_model(recipe.model.source, gguf_file=recipe.model.gguf_file, revision=recipe.model.revision)
        progress.update(task, total=1, completed=1)
        weights = weight_format(recipe, src)  # from_checkpoint: bits/group_size/sym/dtype are the checkpoint's
        spec = QuantSpec(bits=weights.bits, group_size=weights.group_size, sym=weights.sym)
        check_shapes(src.config, spec.group_size)
        dtype = weights.dtype
        quantizer = layer_quantizer(recipe, src, spec, dtype)
        check_disk_space(out, estimated_artifact_bytes(src.config, spec.bits, spec.group_size,
                                                       torch.empty((), dtype=dtype).element_size()))
        compute_dtype = resolve_dtype(recipe.runtime.dtype, torch.float32) if recipe.runtime.dtype != "auto" else torch.float32
        tokenizer = src.tokenizer()
        stages["load"] = time.time() - t0

        t = time.time()
        tokens = calibration_tokens(recipe, src, tokenizer, device, compute_dtype, progress)
        stages["calibration data"] = time.time() - t

        t = time.time()
        quant = TealQuantConfig(
            bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
            quantizer="gptq" if recipe.quantization.method == "from_checkpoint" else recipe.quantization.method,
            levels=levels, default=sp.default, allocation=sp.allocation, prefill=sp.prefill, criterion=sp.criterion,
            act_order=bool(getattr(src, "act_order", False)),
        )
        settings = stream_settings(recipe, levels, compute_dtype, dtype, device)
        writer = ArtifactWriter(out, max_shard_size=parse_size(recipe.output.max_shard_size), overwrite=overwrite,
                                sources=[src.path])
        with writer:
            hidden = embed_calibration_tokens(src, tokens, compute_dtype, writer, dtype)
            report_layers, dense_params = [], hidden.dense_params
            layers_task = progress.add_task("compressing layers", total=src.num_layers, plain="steps")
            greedy = {}

            def on_stage(i: int, name: str) -> None:
                if name == "allocate":
                    greedy[i] = progress.add_task(f"layer {i}: {sp.allocation} allocation", total=levels[-1] or 1.0,
                                                  plain=None)
                elif i in greedy:
                    progress.remove_task(greedy.pop(i))

            for result in compress_layers(src.config, src, quantizer, hidden.states, settings, on_stage=on_stage,
                                          greedy_progress=lambda i, eff: progress.update(greedy[i], completed=eff)):
                writer.add(result.tensors)
                report_layers.append(result.report)
                dense_params += result.dense_params
                progress.advance(layers_task)
            non_layer = src.tensors([n for n in src.non_layer_tensor_names() if n != EMBEDDING_KEY])
            dense_params += sum(t.numel() for t in non_layer.values())
            writer.add({n: t.to(dtype) for n, t in non_layer.items()})
            report = _write_metadata(writer, recipe, src, tokenizer, quant, dtype, report_layers)
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

    block_layers = [r["block_error"] for r in report_layers]
    return Compression(
        artifact=path, levels=levels, default_level=sp.default, calibration_sparsity=calibration_sparsity,
        block_error={k: _mean_over_layers(block_layers, k, len(levels)) for k in block_layers[0]},
        artifact_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        dense_bytes=dense_params * torch.empty((), dtype=dtype).element_size(), stage_seconds=stages, eval_rows=eval_rows,
    )


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
                          greedy_tokens=sp.greedy.tokens, last_fraction=sp.greedy.last_fraction,
                          compute_dtype=compute_dtype, storage_dtype=dtype, device=device, criterion=sp.criterion)


@dataclass
class _Embedded:
    states: HiddenStates
    dense_params: int


def embed_calibration_tokens(src: ModelSource, tokens: torch.Tensor, compute_dtype: torch.dtype,
                             writer: ArtifactWriter, dtype: torch.dtype) -> _Embedded:
    """The hidden states entering layer 0 (the embeddings of the calibration tokens), in the one buffer the layers
    update in place; the embedding goes into the artifact right away and is then freed."""
    embed = src.tensors([EMBEDDING_KEY])[EMBEDDING_KEY]
    samples, seq_len = tokens.shape
    states = HiddenStates.in_memory((samples, seq_len, embed.shape[1]), compute_dtype)
    for start in range(0, samples, 8):
        states.write_input(start, embed[tokens[start:start + 8]])
    writer.add({EMBEDDING_KEY: embed.to(dtype)})
    return _Embedded(states, embed.numel())


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


def _write_metadata(writer: ArtifactWriter, recipe: Recipe, src: ModelSource, tokenizer, quant, dtype, report_layers) -> dict:
    """Everything but the tensors and the model card: config (with the resolved quantization_config), generation
    config, tokenizer, the recipe as it was read, and the calibration report."""
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
              "layers": report_layers}
    writer.write_json(REPORT_FILE, report)
    return report
