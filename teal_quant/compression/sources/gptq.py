"""Existing GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers "gptq", format v1 or v2) as a model source.

A GPTQ linear L stores (layouts checked against AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py``:
``pack`` does ``zeros -= 1`` before packing and ``forward`` unpacks with ``zeros = zeros + 1``, then
``weights = scales[g_idx] * (weight - zeros[g_idx])``; and GPTQModel ``PackableQuantLinear.dequantize_weight`` in
``gptqmodel/nn_modules/qlinear/__init__.py``, which unpacks ``qweight.unsqueeze(1) >> wf.unsqueeze(-1)`` along K and
``qzeros.unsqueeze(2) >> wf.unsqueeze(0)`` along N, with wf = 0, bits, 2*bits, ... < 32):

* ``L.qweight`` int32 [K*bits/32, N]: code q[k, n] is in word k // (32/bits), bits (k % (32/bits))*bits and up;
* ``L.qzeros``  int32 [G_count, N*bits/32]: zero z[g, n] in word n // (32/bits) the same way; format v1 ("gptq")
  stores z - 1 (read back per element as nibble + 1, as AutoGPTQ does), v2 ("gptq_v2") stores z;
* ``L.scales`` [G_count, N] (float16), ``L.g_idx`` int32 [K] (the group of input channel k), ``L.bias`` optional;
* W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]).

:func:`repack_linear` turns that into the teal-quant artifact layout bit for bit: codes -> ``kernels.pack`` [K, N],
scales unchanged, zeros = float(z). An act-order (desc_act) g_idx scatters the groups over K; the rows of W^T are then
stored in the order perm = stable argsort(g_idx), which makes every group contiguous, and ``P.perm`` records it
(TealLinear computes x[..., perm] @ W^T_stored, the same product since thresholding is elementwise).

:class:`GPTQSource` is a :class:`~teal_quant.compression.sources.base.ModelSource` whose projections read as the
float weights the checkpoint really computes (so the pipeline calibrates thresholds on the model as it is), and
whose :meth:`GPTQSource.packed` gives the checkpoint's codes, repacked, for the artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from teal_quant.architecture import LAYERS_PREFIX, PROJECTIONS, build_skeleton
from teal_quant.compression.recipe import FORMAT_KEYS
from teal_quant.compression.sources.base import ModelSource
from teal_quant.devices import resolve_dtype
from teal_quant.errors import ModelSourceError, RecipeError
from teal_quant.kernels import dequantize, pack

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQFormat:
    """The settings of a GPTQ checkpoint that decide how its tensors are read."""

    bits: int
    group_size: int  # -1: one group spanning all of K
    sym: bool
    desc_act: bool
    checkpoint_format: str  # "gptq" (v1: zeros stored minus one) or "gptq_v2"

    @property
    def zero_offset(self) -> int:
        return 1 if self.checkpoint_format == "gptq" else 0


def gptq_settings(path: Path, where: str) -> dict | None:
    """The raw GPTQ settings of a checkpoint directory: config.json's quantization_config when its quant_method is
    gptq, else a separate quantize_config.json (AutoGPTQ); None for a checkpoint that is not GPTQ."""
    config_file = path / "config.json"
    config = _read_json(config_file, where) if config_file.is_file() else {}
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        return qc if str(qc.get("quant_method", "")).lower() == "gptq" else None
    separate = path / "quantize_config.json"
    if separate.is_file():
        return _read_json(separate, where)
    return None


def parse_format(settings: dict, where: str) -> GPTQFormat:
    """Validate GPTQ settings; each unsupported value is one ModelSourceError line naming the key."""
    method = str(settings.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise ModelSourceError(f"{where}: quant_method is {method!r}, not gptq")
    fmt = str(settings.get("checkpoint_format", "marlin" if settings.get("is_marlin_format") else "gptq")).lower()
    if fmt not in CHECKPOINT_FORMATS:
        raise ModelSourceError(f"{where}: checkpoint_format {fmt!r} is a repacked kernel layout teal-quant does not read "
                               f"(supported: {', '.join(CHECKPOINT_FORMATS)}); export the model in plain gptq format")
    try:
        bits, group_size = int(settings["bits"]), int(settings.get("group_size", -1))
    except (KeyError, TypeError, ValueError):
        raise ModelSourceError(f"{where}: GPTQ settings need integer 'bits' and 'group_size'") from None
    if bits not in (4, 8):
        raise ModelSourceError(f"{where}: bits {bits} is not supported (teal-quant reads 4- and 8-bit GPTQ)")
    if group_size != -1 and (group_size < 8 or group_size & (group_size - 1)):
        raise ModelSourceError(f"{where}: group_size {group_size} is not supported (a power of two >= 8, or -1)")
    if str(settings.get("pack_dtype", "int32")).replace("torch.", "") != "int32":
        raise ModelSourceError(f"{where}: pack_dtype {settings['pack_dtype']!r} is not supported (int32 only)")
    if settings.get("dynamic"):
        raise ModelSourceError(f"{where}: per-module 'dynamic' GPTQ settings are not supported")
    if settings.get("lm_head"):
        raise ModelSourceError(f"{where}: a quantized lm_head is not supported (teal-quant keeps lm_head in float)")
    return GPTQFormat(bits=bits, group_size=group_size, sym=bool(settings.get("sym", True)),
                      desc_act=bool(settings.get("desc_act", False)), checkpoint_format=fmt)


def unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 [R * 32/bits, C]: value i of word (r, c) (bits i*bits and up) becomes row r*32/bits + i."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1])


def unpack_along_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, C * 32/bits]: value i of word (r, c) becomes column c*32/bits + i."""
    return unpack_along_rows(packed.t().contiguous(), bits).t().contiguous()


@dataclass
class RepackedLinear:
    """One linear in the artifact layout: W^T rows stored in `perm` order (None: natural order)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    perm: torch.Tensor | None

    def artifact_tensors(self, *, with_perm: bool) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if with_perm:
            k = self.qweight.shape[0]
            out["perm"] = self.perm if self.perm is not None else torch.arange(k, dtype=torch.int32)
        return out

    def weight(self, bits: int) -> torch.Tensor:
        """The float32 [N, K] weight the checkpoint computes (rows of W^T put back in input-channel order)."""
        w_t = dequantize(self.qweight, self.scales.float(), self.zeros.float(), bits=bits, group_size=self.group_size)
        if self.perm is not None:
            w_t = torch.empty_like(w_t).index_copy_(0, self.perm.long(), w_t)
        return w_t.t().contiguous()


def repack_linear(tensors: dict[str, torch.Tensor], fmt: GPTQFormat, name: str, in_features: int,
                  out_features: int) -> RepackedLinear:
    """GPTQ tensors of one linear (keys qweight, qzeros, scales, g_idx) -> the artifact layout, bit for bit."""
    K, N, bits = in_features, out_features, fmt.bits
    group = K if fmt.group_size == -1 else fmt.group_size
    if K % group:
        raise ModelSourceError(f"{name}: group_size {group} does not divide in_features {K}")
    groups, per_word = K // group, 32 // bits
    expected = {"qweight": (K // per_word, N), "qzeros": (groups, N // per_word), "scales": (groups, N), "g_idx": (K,)}
    for key, shape in expected.items():
        if key not in tensors:
            if key == "g_idx" and not fmt.desc_act:
                continue
            raise ModelSourceError(f"{name}.{key}: tensor is missing from the checkpoint")
        if tuple(tensors[key].shape) != shape:
            raise ModelSourceError(f"{name}.{key}: shape {tuple(tensors[key].shape)} does not match "
                                   f"in_features {K}, out_features {N}, bits {bits}, group_size {group} (expected {shape})")
    for key in ("qweight", "qzeros"):
        if tensors[key].dtype != torch.int32:
            raise ModelSourceError(f"{name}.{key}: dtype {tensors[key].dtype} is not int32")
    if not tensors["scales"].is_floating_point():
        raise ModelSourceError(f"{name}.scales: dtype {tensors['scales'].dtype} is not a float type")
    natural = torch.arange(K, dtype=torch.int64) // group
    g_idx = tensors["g_idx"].long() if "g_idx" in tensors else natural
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ModelSourceError(f"{name}.g_idx: group indices must lie in [0, {groups})")
    perm = None
    if not torch.equal(g_idx, natural):
        order = torch.sort(g_idx, stable=True).indices
        if not torch.equal(g_idx[order], natural):
            raise ModelSourceError(f"{name}.g_idx: groups of unequal size (each of the {groups} groups must hold "
                                   f"exactly {group} input channels)")
        perm = order.to(torch.int32)
    q = unpack_along_rows(tensors["qweight"], bits)  # [K, N], natural input-channel order
    if perm is not None:
        q = q.index_select(0, perm.long())
    zeros = unpack_along_cols(tensors["qzeros"], bits) + fmt.zero_offset  # [groups, N]
    scales = tensors["scales"]
    return RepackedLinear(qweight=pack(q.to(torch.uint8), bits), scales=scales,
                          zeros=zeros.to(scales.dtype), group_size=group, perm=perm)


@dataclass
class GPTQSource(ModelSource):
    """A GPTQ checkpoint: projections read as their dequantized float weights; `packed` gives the codes."""

    fmt: GPTQFormat | None = None
    linears: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # name -> (in, out)
    _cache: dict[str, RepackedLinear] = field(default_factory=dict, repr=False)
    _act_order: bool | None = field(default=None, repr=False)

    def repacked(self, name: str) -> RepackedLinear:
        if name not in self._cache:
            if len(self._cache) > 16:  # one layer's projections at a time is all the pipeline needs
                self._cache.clear()
            keys = [f"{name}.{s}" for s in GPTQ_SUFFIXES if f"{name}.{s}" in self._index]
            raw = ModelSource.tensors(self, keys)
            tensors = {k[len(name) + 1:]: t for k, t in raw.items()}
            self._cache[name] = repack_linear(tensors, self.fmt, name, *self.linears[name])
        return self._cache[name]

    @property
    def act_order(self) -> bool:
        """True when some linear's g_idx is not k // G (then every linear of the artifact stores P.perm)."""
        if self._act_order is None:
            self._act_order = False
            for name, (k, _) in self.linears.items():
                key = f"{name}.g_idx"
                if key in self._index:
                    g_idx = ModelSource.tensors(self, [key])[key].long()
                    group = k if self.fmt.group_size == -1 else self.fmt.group_size
                    if g_idx.shape != (k,) or not torch.equal(g_idx, torch.arange(k) // group):
                        self._act_order = True
                        break
        return self._act_order

    @property
    def scales_dtype(self) -> torch.dtype:
        first = next(iter(self.linears))
        return ModelSource.tensors(self, [f"{first}.scales"])[f"{first}.scales"].dtype

    def packed(self, name: str) -> dict[str, torch.Tensor]:
        """The artifact tensors of linear `name` (suffix -> tensor): qweight, scales, zeros, and perm if act-order."""
        return self.repacked(name).artifact_tensors(with_perm=self.act_order)

    def quantizer(self) -> "CheckpointCodes":
        """quantization.method from_checkpoint: this checkpoint's codes as the layer loop's quantizer."""
        return CheckpointCodes(self)

    def tensor_names(self) -> list[str]:
        gptq = {f"{n}.{s}" for n in self.linears for s in GPTQ_SUFFIXES}
        return sorted([n for n in self._index if n not in gptq] + [f"{n}.weight" for n in self.linears])

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        weights = {n for n in names if n.endswith(".weight") and n[: -len(".weight")] in self.linears}
        out = ModelSource.tensors(self, [n for n in names if n not in weights])
        for n in weights:
            out[n] = self.repacked(n[: -len(".weight")]).weight(self.fmt.bits)
        return {n: out[n] for n in names}


class CheckpointCodes:
    """The layer loop's quantizer for from_checkpoint (compression.stream.LayerQuantizer): each projection's codes are
    the checkpoint's, repacked bit for bit; the float weight the layer was calibrated with already is their
    dequantization (GPTQSource.tensors), so nothing changes for propagation."""

    def __init__(self, source: GPTQSource):
        self.source = source

    def prepare(self, work) -> None:
        return None

    def quantize(self, work, proj: str) -> tuple[dict[str, torch.Tensor], None]:
        return self.source.packed(work.module_name(proj)), None

    def finish(self, work) -> dict:
        return {}


def open_gptq(path: Path, config, settings: dict, *, source: str, revision: str | None,
              index: dict[str, Path]) -> GPTQSource:
    """A GPTQSource for a checkpoint whose settings `gptq_settings` found; checks every projection is GPTQ-packed."""
    fmt = parse_format(settings, f"model '{source}'")
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is a float model; the artifact gets its own
    skeleton = build_skeleton(config, torch.float16)
    linears: dict[str, tuple[int, int]] = {}
    for i in range(int(config.num_hidden_layers)):
        for module_path in PROJECTIONS.values():
            name = f"{LAYERS_PREFIX}.{i}.{module_path}"
            if f"{name}.qweight" not in index:
                raise ModelSourceError(f"model '{source}': {name}.qweight: tensor is missing from the checkpoint "
                                       "(every decoder-layer projection must be GPTQ-quantized)")
            linear = skeleton.get_submodule(name)
            linears[name] = (linear.in_features, linear.out_features)
    extra = sorted(n for n in index if n.endswith(".qweight") and n[: -len(".qweight")] not in linears)
    if extra:
        raise ModelSourceError(f"model '{source}': {extra[0]}: only decoder-layer projections can be quantized "
                               "(teal-quant keeps embeddings and lm_head in float)")
    src = GPTQSource(path=path, config=config, revision=revision, fmt=fmt, linears=linears)
    src._index = index
    return src


@dataclass(frozen=True)
class WeightFormat:
    """How the artifact stores its weights, resolved once from the recipe and the source (the recipe stays as read):
    the integer format of the projections and the float dtype of everything else (scales and zeros included)."""

    bits: int
    group_size: int  # -1: per-channel
    sym: bool
    dtype: torch.dtype


def weight_format(recipe, src: ModelSource) -> WeightFormat:
    """The recipe's quantization format, checked against the source. A float model takes the recipe's bits,
    group_size and sym; a GPTQ checkpoint (quantization.method from_checkpoint) its own, and the dtype of its scales
    for model.dtype auto. A recipe that sets a different one is an error naming the key."""
    q = recipe.quantization
    if not isinstance(src, GPTQSource):
        if q.method == "from_checkpoint":
            raise RecipeError(f"quantization.method: from_checkpoint needs a GPTQ checkpoint as model.source; "
                              f"'{recipe.model.source}' is a float model (use rtn or gptq)")
        return WeightFormat(bits=q.bits, group_size=q.group_size, sym=q.sym,
                            dtype=resolve_dtype(recipe.model.dtype, getattr(src.config, "dtype", None)))
    if q.method != "from_checkpoint":
        raise RecipeError(f"quantization.method: '{recipe.model.source}' is a GPTQ checkpoint; {q.method} would "
                          "quantize it again: use from_checkpoint")
    fmt = src.fmt
    for key in FORMAT_KEYS:
        value = getattr(fmt, key)
        if key in q.model_fields_set and getattr(q, key) != value:
            raise RecipeError(f"quantization.{key}: {getattr(q, key)} differs from the checkpoint's {value} "
                              "(from_checkpoint keeps the checkpoint's format; leave it out)")
    dtype = resolve_dtype(recipe.model.dtype, src.scales_dtype)
    if recipe.model.dtype != "auto" and dtype != src.scales_dtype:
        raise RecipeError(f"model.dtype: {recipe.model.dtype} would round the checkpoint's {src.scales_dtype} scales; "
                          "use auto")
    return WeightFormat(bits=fmt.bits, group_size=fmt.group_size, sym=fmt.sym, dtype=dtype)


def _read_json(file: Path, where: str) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{where}: {file.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{where}: {file.name} is not a JSON object")
    return data
