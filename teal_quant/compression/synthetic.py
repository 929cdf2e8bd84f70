"""Synthetic artifacts of a real architecture (Llama-3 8B/70B shapes): random packed weights, real TEAL thresholds.

Decode speed depends on the shapes, the bytes read and the realized sparsity, not on what the weights mean; the
real Llama-3 weights cannot be downloaded here, and a 70B compression run costs hours. So the weights are random
int4/int8 codes whose scales give the dequantized weights a realistic spread (std 1/sqrt(K); o/down further by
1/sqrt(2 * layers), so the residual stream stays bounded over 80 layers), while the thresholds are calibrated the
way the pipeline does it, on the activations this very model produces: random token ids -> embeddings -> for each
layer build only that layer (dequantized weights), capture |x| at its four activation points, compute the uniform
allocation's thresholds for every level, propagate the hidden states at the default level, drop the layer.
At most one float layer exists at a time, so a 70B artifact is made on one GPU.

The per-layer work is the pipeline's own layer loop (compression.stream), with this module's random codes as both
the weights and the quantizer. Two sinks share the per-layer generator's stream (`SyntheticLayers.stream`): `write_synthetic` here (an artifact
on disk, through ArtifactWriter) and teal_quant.bench.build_synthetic_model (the TealLinear model assembled directly
on the device by runtime.assemble, for `teal-quant bench`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from teal_quant.architecture import PROJECTIONS, SUPPORTED_MODEL_TYPES, build_skeleton, check_shapes
from teal_quant.artifact.format import (
    EMBEDDING_KEY,
    HEAD_FORMATS,
    LM_HEAD_KEY,
    REPORT_FILE,
    ArtifactWriter,
    TealQuantConfig,
)
from teal_quant.compression.head import check_head_shape, quantized_head
from teal_quant.compression.hidden import HiddenStates
from teal_quant.compression.quantize.rtn import QuantSpec, dequantize_codes
from teal_quant.compression.stream import StreamSettings, compress_layers
from teal_quant.devices import select_device
from teal_quant.errors import ModelSourceError, TealQuantError, first_line
from teal_quant.kernels import pack

ARCHS = {"llama3-8b": "llama3_8b.json", "llama3-70b": "llama3_70b.json"}
STORAGE_DTYPE = torch.bfloat16  # the artifact's dtype (scales, zeros, embeddings, norms, lm_head)
OUTPUT_PROJECTIONS = ("o", "down")  # write into the residual stream: scaled down by 1/sqrt(2 * layers)
QK_SHARPNESS = 2.0  # q and k weights x2: attention logits q.k/sqrt(d) get std ~4 (peaked, like trained models)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to synthesize: the integer format, the sparsity levels, the seed and the calibration token count."""

    bits: int = 4
    group_size: int = 128
    levels: tuple[float, ...] = (0.25, 0.4, 0.5)  # positive levels; level 0 is always added
    default: float = 0.4
    seed: int = 0
    samples: int = 4  # random sequences the thresholds are calibrated on
    seq_len: int = 256
    lm_head: str = "dense"  # dense | int8 | int4: the output projection quantized with RTN (group_size as above)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise TealQuantError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise TealQuantError(f"group size must be positive or -1 (per-channel), got {self.group_size}")
        levels = self.all_levels
        if any(not 0.0 <= lv < 1.0 for lv in levels) or any(b <= a for a, b in zip(levels, levels[1:])):
            raise TealQuantError(f"levels {list(self.levels)} must be distinct, in (0, 1) and increasing")
        if not any(abs(lv - self.default) < 1e-9 for lv in levels):
            raise TealQuantError(f"default level {self.default} is not one of the levels {levels}")
        if self.samples < 1 or self.seq_len < 2:
            raise TealQuantError("calibration needs at least 1 sample of 2 tokens")
        if self.lm_head not in HEAD_FORMATS:
            raise TealQuantError(f"lm_head must be one of {', '.join(HEAD_FORMATS)}, got {self.lm_head!r}")

    @property
    def all_levels(self) -> list[float]:
        return [0.0] + [float(lv) for lv in self.levels if float(lv) != 0.0]

    @property
    def quant_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, sym=False)

    def quant_config(self) -> TealQuantConfig:
        head = HEAD_FORMATS[self.lm_head]
        return TealQuantConfig(bits=self.bits, group_size=self.group_size, sym=False, quantizer="synthetic",
                               levels=self.all_levels, default=float(self.default), allocation="uniform",
                               lm_head_bits=head, lm_head_group_size=None if head is None else self.group_size,
                               modules_to_not_convert=[] if head is not None else ["lm_head"])


def resolve_arch(arch: str | Path):
    """llama3-8b | llama3-70b (package data) | a config.json path (or a directory holding one) -> a model config."""
    from transformers import AutoConfig, PretrainedConfig

    name = str(arch)
    if name in ARCHS:
        d = json.loads(resources.files("teal_quant").joinpath("configs", ARCHS[name]).read_text())
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelSourceError(f"arch '{name}': not {' or '.join(ARCHS)}, and no such config.json")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelSourceError(f"arch '{name}': {path.name} is not valid JSON ({first_line(e)})") from None
    if not isinstance(d, dict) or d.get("model_type") not in SUPPORTED_MODEL_TYPES:
        got = d.get("model_type") if isinstance(d, dict) else None
        raise ModelSourceError(f"arch '{name}': unsupported model_type {got!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if d.get("quantization_config"):
        raise ModelSourceError(f"arch '{name}': is a quantized model's config; give the base architecture's config.json")
    try:
        config = AutoConfig.for_model(**d)
    except Exception as e:
        raise ModelSourceError(f"arch '{name}': not a valid {d['model_type']} config ({first_line(e)})") from None
    assert isinstance(config, PretrainedConfig)
    return config


def code_std(bits: int) -> float:
    """Standard deviation of codes drawn uniformly from 0 .. 2^bits - 1."""
    n = 1 << bits
    return math.sqrt((n * n - 1) / 12.0)


def random_projection(k: int, n: int, std: float, spec: QuantSpec, generator: torch.Generator, device) -> tuple:
    """Uniform random codes q [K, N] and (scales, zeros) [K/G, N] in STORAGE_DTYPE; W^T = (q - zeros) * scales has
    mean 0 and std ~ `std` (each group's scale jittered by a log-normal factor of spread 10 %, like real groups)."""
    groups = k // spec.resolved_group_size(k)
    q = torch.randint(0, spec.qmax + 1, (k, n), generator=generator, device=device, dtype=torch.uint8)
    jitter = torch.exp(0.1 * torch.randn(groups, n, generator=generator, device=device))
    scales = (std / code_std(spec.bits) * jitter).to(STORAGE_DTYPE)
    zeros = torch.full((groups, n), spec.qmax / 2.0, device=device, dtype=STORAGE_DTYPE)
    return q, scales, zeros


def projection_std(proj: str, in_features: int, num_layers: int) -> float:
    """1/sqrt(K); o/down / sqrt(2 * layers); q/k * QK_SHARPNESS so attention logits have std ~4, not ~1: with flat
    attention, its output would shrink like 1/sqrt(context) and the o thresholds would depend on the length."""
    std = 1.0 / math.sqrt(in_features)
    if proj in OUTPUT_PROJECTIONS:
        return std / math.sqrt(2 * num_layers)
    return std * QK_SHARPNESS if proj in ("q", "k") else std


@dataclass
class SyntheticLayers:
    """The per-layer generator both sinks share. Tensors come out on `device`, keyed by their artifact names.

    For the layer loop (compression.stream.compress_layers) it is both the `LayerWeights` (each layer's random
    codes drawn, dequantized into float weights) and the `LayerQuantizer` (the drawn codes are the packed tensors)."""

    config: object
    spec: SyntheticSpec
    device: torch.device
    report: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_shapes(self.config, self.spec.group_size, option="--group-size")
        self.config._attn_implementation = "sdpa"
        # bf16 on a GPU (what the model runs in); float32 on the CPU, where half-precision matmuls are slow.
        self.compute_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.generator = torch.Generator(device=self.device).manual_seed(self.spec.seed)
        self._shapes = build_skeleton(self.config, torch.float32)  # meta: the names and shapes of every parameter
        self._codes: dict[str, dict[str, torch.Tensor]] = {}

    def _randn(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.generator, device=self.device, dtype=torch.float32)
        return (t * std + mean).to(STORAGE_DTYPE)

    def non_layer_tensors(self) -> dict[str, torch.Tensor]:
        """Embeddings (std 1), the final norm (~1) and lm_head (std 1/sqrt(hidden)), all in STORAGE_DTYPE."""
        c = self.config
        out = {
            EMBEDDING_KEY: self._randn(c.vocab_size, c.hidden_size),
            "model.norm.weight": self._randn(c.hidden_size, std=0.05, mean=1.0),
        }
        if not getattr(c, "tie_word_embeddings", False):
            out[LM_HEAD_KEY] = self._randn(c.vocab_size, c.hidden_size, std=1.0 / math.sqrt(c.hidden_size))
        bits = HEAD_FORMATS[self.spec.lm_head]
        if bits is not None:  # its own packed tensors (from the tied embedding when there is no head of its own)
            check_head_shape(c, bits)
            weight = out.pop(LM_HEAD_KEY, out[EMBEDDING_KEY])
            out.update(quantized_head(weight.to(self.device), QuantSpec(bits, self.spec.group_size, sym=False),
                                      STORAGE_DTYPE))
        return out

    # ---- LayerWeights
    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        """Random codes for each projection (kept for `quantize`), dequantized into the float weights the layer is
        calibrated with; norms (~1) and any other parameter (small) drawn in STORAGE_DTYPE."""
        c, spec, qspec = self.config, self.spec, self.spec.quant_spec
        layer = self._shapes.model.layers[index]
        state: dict[str, torch.Tensor] = {}
        for proj, path in PROJECTIONS.items():
            linear = layer.get_submodule(path)
            q, scales, zeros = random_projection(linear.in_features, linear.out_features,
                                                 projection_std(proj, linear.in_features, c.num_hidden_layers),
                                                 qspec, self.generator, self.device)
            state[f"{path}.weight"] = dequantize_codes(q, scales, zeros, qspec).t()
            self._codes[proj] = {"qweight": pack(q, spec.bits), "scales": scales, "zeros": zeros}
            if linear.bias is not None:
                state[f"{path}.bias"] = self._randn(linear.out_features, std=0.02)
        for name, param in layer.named_parameters():
            if name not in state:
                state[name] = self._randn(*param.shape, std=0.05, mean=1.0 if "norm" in name else 0.0)
        return state

    def release(self, index: int) -> None:
        self._codes = {}

    # ---- LayerQuantizer
    def prepare(self, work) -> None:
        return None

    def quantize(self, work, proj: str) -> tuple[dict[str, torch.Tensor], None]:
        return self._codes[proj], None  # the float weight already is the codes' dequantization

    def finish(self, work) -> dict:
        return {}

    @torch.no_grad()
    def layers(self, embed: torch.Tensor, progress: Callable[[int], None] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield each decoder layer's tensors (packed projections, thresholds, norms), calibrated in order."""
        spec, c, device, dtype = self.spec, self.config, self.device, self.compute_dtype
        tokens = torch.randint(0, c.vocab_size, (spec.samples, spec.seq_len), generator=self.generator, device=device)
        hidden = HiddenStates.in_memory((spec.samples, spec.seq_len, c.hidden_size), dtype, device)
        hidden.write_input(0, nn.functional.embedding(tokens, embed.to(device=device, dtype=dtype)))
        settings = StreamSettings(levels=spec.all_levels, default_level=spec.default, allocation="uniform", step=0.1,
                                  greedy_tokens=spec.seq_len, last_fraction=0.5, compute_dtype=dtype,
                                  storage_dtype=STORAGE_DTYPE, device=device, compare_uniform=False)
        for result in compress_layers(c, self, self, hidden, settings):
            result.report["hidden_rms"] = float(hidden.tensor.float().pow(2).mean().sqrt())
            self.report.append(result.report)
            yield result.tensors
            if progress is not None:
                progress(1)

    def stream(self, progress: Callable[[int], None] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Every tensor of the model: the non-layer ones first, then each decoder layer's (`layers`)."""
        non_layer = self.non_layer_tensors()
        yield non_layer
        yield from self.layers(non_layer[EMBEDDING_KEY], progress=progress)


def write_synthetic(arch: str | Path, output: str | Path, spec: SyntheticSpec = SyntheticSpec(), *,
                    device: str | torch.device | None = None, overwrite: bool = False, max_shard_size: int = 5 * 10**9) -> Path:
    """Write a synthetic artifact of `arch` to `output` (temp dir + rename); teal_quant.load reads it."""
    from transformers import GenerationConfig

    from teal_quant.artifact.format import check_destination
    from teal_quant.progress import Progress

    local_arch = [Path(arch)] if Path(arch).exists() else []
    check_destination(output, overwrite=overwrite, sources=local_arch)  # before any weight is drawn
    config = resolve_arch(arch)
    device = select_device(device)
    gen = SyntheticLayers(config, spec, device)
    quant = spec.quant_config()
    with Progress() as progress, ArtifactWriter(Path(output), max_shard_size=max_shard_size, overwrite=overwrite,
                                                  sources=local_arch) as writer:
        task = progress.add_task(f"synthesizing {arch}", total=config.num_hidden_layers, plain="steps")
        for tensors in gen.stream(progress=lambda n: progress.advance(task, n)):
            writer.add(tensors)
        config.dtype = STORAGE_DTYPE
        config.quantization_config = quant.to_dict()
        if quant.head_quantized:
            config.tie_word_embeddings = False
        config.save_pretrained(writer.dir)
        GenerationConfig.from_model_config(config).save_pretrained(writer.dir)
        writer.write_json(REPORT_FILE, {"synthetic": {"arch": str(arch), "seed": spec.seed, "samples": spec.samples,
                                                      "seq_len": spec.seq_len}, "levels": quant.levels, "layers": gen.report})
        writer.write_text("README.md", _card(str(arch), spec))
        return writer.commit()


def _card(arch: str, spec: SyntheticSpec) -> str:
    return (
        "---\nlibrary_name: teal-quant\ntags: [teal-quant, synthetic, benchmark]\n---\n"
        f"# Synthetic {arch} (teal-quant)\n\n"
        "**Random weights, for speed benchmarks only: this model produces no meaningful text.**\n\n"
        f"int{spec.bits} codes drawn uniformly, group size {spec.group_size}, scales chosen so the dequantized weights "
        "have std 1/sqrt(in_features) (o/down: further / sqrt(2 * layers)). TEAL thresholds (uniform allocation, "
        f"levels {', '.join(f'{lv:g}' for lv in spec.all_levels)}, default {spec.default:g}) were calibrated layer by "
        f"layer on the activations of this model for {spec.samples} x {spec.seq_len} random token ids "
        f"(seed {spec.seed}). Made by `teal-quant synthesize`; see docs/bench.md.\n"
    )
