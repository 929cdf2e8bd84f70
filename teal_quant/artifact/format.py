"""The on-disk artifact (format_version 1): the only code that knows file names, tensor keys and metadata.

An artifact is a Hugging Face model directory: config.json with a `quantization_config` of
quant_method "teal_quant", sharded safetensors with an index, tokenizer files, recipe.yaml, a
calibration report and a model card. docs/artifact-format.md is the human-readable spec.
It is written into a temporary directory beside the destination and renamed only when complete, so an
interrupted run never leaves a half-written artifact under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from teal_quant import __version__
from teal_quant.architecture import CRITERIA, LAYERS_PREFIX
from teal_quant.errors import ArtifactError, first_line

FORMAT_VERSION = 1
QUANT_METHOD = "teal_quant"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "calibration_report.json"
CARD_FILE = "README.md"
SHARD_PATTERNS = ("model-*-of-*.safetensors", SINGLE_FILE)  # the weight files an artifact may have (stale after a re-shard)
ALLOCATION_PLOT_FILE = "allocation.png"  # the allocation heatmap the card embeds (when matplotlib is installed)
PACKING = {4: "int4-n8", 8: "int8"}

# Tensor keys: a transformers model's state_dict keys, with each quantized linear P (e.g.
# model.layers.3.self_attn.q_proj) stored as P.qweight, P.scales, P.zeros, P.thresholds, and P.bias if it has one;
# P.channel_scale (float32 [K]) on every quantized linear when sparsity.criterion is weight_aware (architecture.CRITERIA);
# P.perm (int32 [K]) on every linear when quantization_config.act_order is true (imported act-order GPTQ).
QUANT_SUFFIXES = ("qweight", "scales", "zeros", "thresholds")
CHANNEL_SCALE_SUFFIX = "channel_scale"
PERM_SUFFIX = "perm"
LINEAR_SUFFIXES = (*QUANT_SUFFIXES, "bias", CHANNEL_SCALE_SUFFIX, PERM_SUFFIX)
FLOAT32_SUFFIXES = ("thresholds", CHANNEL_SCALE_SUFFIX)  # stored and loaded in float32 whatever the model dtype
EMBEDDING_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"  # absent when tie_word_embeddings: lm_head is the embedding


def linear_key(module_name: str, suffix: str) -> str:
    """The key of one tensor of a quantized linear: linear_key("model.layers.0.mlp.up_proj", "qweight")."""
    if suffix not in LINEAR_SUFFIXES:
        raise ValueError(f"'{suffix}' is not a tensor of a quantized linear ({', '.join(LINEAR_SUFFIXES)})")
    return f"{module_name}.{suffix}"


def linear_tensor_names(module_name: str, *, bias: bool = False, channel_scale: bool = False,
                        perm: bool = False) -> list[str]:
    """Every key a quantized linear has in an artifact."""
    optional = {"bias": bias, CHANNEL_SCALE_SUFFIX: channel_scale, PERM_SUFFIX: perm}
    return [linear_key(module_name, s) for s in QUANT_SUFFIXES + tuple(s for s, wanted in optional.items() if wanted)]


def linear_of(key: str, suffix: str) -> str | None:
    """The linear whose `suffix` tensor `key` is (model.layers.0.mlp.up_proj for its .qweight), else None."""
    module, _, last = key.rpartition(".")
    return module if last == suffix and module else None


def layer_key_prefix(index: int) -> str:
    """What every key of decoder layer `index` starts with: 'model.layers.{index}.'."""
    return f"{LAYERS_PREFIX}.{index}."


def stored_float32(key: str) -> bool:
    """True for the tensors an artifact keeps in float32 whatever its dtype (thresholds, channel scales)."""
    return key.rpartition(".")[2] in FLOAT32_SUFFIXES


@dataclass(frozen=True)
class TealQuantConfig:
    """`quantization_config` of config.json: everything a loader needs to rebuild the modules."""

    bits: int
    group_size: int  # -1: per-channel (one group spanning all K of each layer)
    sym: bool
    quantizer: str
    levels: list[float]
    default: float
    allocation: str
    prefill: str = "dense"
    criterion: str = "magnitude"
    modules_to_not_convert: list[str] = field(default_factory=lambda: ["lm_head"])
    format_version: int = FORMAT_VERSION
    act_order: bool = False  # every linear has P.perm: y = x[..., perm] @ W^T_stored

    @property
    def packing(self) -> str:
        return PACKING[self.bits]

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def level_index(self, level: float) -> int:
        for i, lv in enumerate(self.levels):
            if abs(lv - level) < 1e-6:
                return i
        raise ValueError(f"sparsity level {level} is not in this artifact (levels: {', '.join(map(str, self.levels))})")

    def to_dict(self) -> dict:
        extra = {"act_order": True} if self.act_order else {}  # written only when true: older readers see no change
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "packing": self.packing,
            "quantizer": self.quantizer,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "sparsity": {
                "method": "teal",
                "allocation": self.allocation,
                "levels": list(self.levels),
                "default": self.default,
                "prefill": self.prefill,
                "criterion": self.criterion,
            },
            "teal_quant_version": __version__,
            **extra,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "TealQuantConfig":
        """Parse and validate; every problem is an ArtifactError naming the field."""
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: no quantization_config, not a teal-quant artifact")
        if d.get("quant_method") != QUANT_METHOD:
            raise ArtifactError(f"{where}: quant_method is {d.get('quant_method')!r}, not a teal-quant artifact")
        if d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{where}: format_version {d.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
        try:
            sp = d["sparsity"]
            cfg = cls(
                bits=int(d["bits"]),
                group_size=int(d["group_size"]),
                sym=bool(d["sym"]),
                quantizer=str(d["quantizer"]),
                levels=[float(x) for x in sp["levels"]],
                default=float(sp["default"]),
                allocation=str(sp["allocation"]),
                prefill=str(sp.get("prefill", "dense")),
                criterion=str(sp.get("criterion", "magnitude")),
                modules_to_not_convert=list(d.get("modules_to_not_convert", [])),
                act_order=bool(d.get("act_order", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: quantization_config is incomplete ({first_line(e)})") from None
        if cfg.bits not in PACKING or d.get("packing") != cfg.packing:
            raise ArtifactError(f"{where}: bits {cfg.bits} / packing {d.get('packing')!r} not supported")
        if not cfg.levels or cfg.levels[0] != 0.0 or any(b <= a for a, b in zip(cfg.levels, cfg.levels[1:])):
            raise ArtifactError(f"{where}: sparsity.levels must start at 0 and increase")
        try:
            cfg.level_index(cfg.default)
        except ValueError as e:
            raise ArtifactError(f"{where}: sparsity.default: {e}") from None
        if cfg.prefill not in ("dense", "sparse"):
            raise ArtifactError(f"{where}: sparsity.prefill {cfg.prefill!r} must be dense or sparse")
        if cfg.criterion not in CRITERIA:
            raise ArtifactError(f"{where}: sparsity.criterion {cfg.criterion!r} must be one of {', '.join(CRITERIA)}")
        return cfg


class ArtifactWriter:
    """Streams tensors into size-bounded shards inside a temp dir; `commit()` renames it into place."""

    def __init__(self, destination: Path, *, max_shard_size: int, overwrite: bool = False):
        self.destination = Path(destination).resolve()
        if self.destination.exists() and not overwrite:
            raise ArtifactError(f"output '{self.destination}' already exists (set output.overwrite: true or pass --overwrite)")
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.partial-", dir=self.destination.parent))
        self.max_shard_size = max_shard_size
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self._finished = False

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._finished:
            raise RuntimeError("ArtifactWriter.add after finish_tensors")
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
                self._flush()
            self._pending[name] = t.detach().to("cpu").contiguous()
            self._pending_bytes += nbytes
            self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.dir / name), metadata={"format": "pt"})
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def write_json(self, name: str, obj) -> None:
        (self.dir / name).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)

    def finish_tensors(self) -> Path:
        """Write the last shard, give the shards their final names and write the index: from here on `self.dir` is a
        complete artifact that read_artifact / load accept (it can be evaluated before `commit`); no tensor may follow."""
        if self._finished:
            return self.dir
        if self._pending:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp_name, self.dir / final)
            weight_map.update({t: final for t in names})
        self.write_json(INDEX_FILE, {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        self._finished = True
        return self.dir

    def commit(self) -> Path:
        """Finish the tensors (if not done yet), then move the directory into place in one rename."""
        self.finish_tensors()
        if self.destination.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.old-", dir=self.destination.parent))
            os.replace(self.destination, old / "artifact")
            os.replace(self.dir, self.destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.dir, self.destination)
        return self.destination

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclass
class Artifact:
    """A validated artifact directory: its config, quantization config and tensor index."""

    path: Path
    config: dict
    quant: TealQuantConfig
    weight_map: dict[str, str]

    def iter_tensors(self, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        files: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            files.setdefault(file, []).append(name)
        for file, names in sorted(files.items()):
            try:
                with safe_open(str(self.path / file), framework="pt", device=str(device)) as f:
                    for name in names:
                        yield name, f.get_tensor(name)
            except ArtifactError:
                raise
            except Exception as e:
                raise ArtifactError(f"artifact '{self.path}': shard {file} is corrupt ({first_line(e)})") from None

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return dict(self.iter_tensors(device))

    def quantized_modules(self) -> list[str]:
        return sorted(m for m in (linear_of(n, "qweight") for n in self.weight_map) if m is not None)

    def recipe_text(self) -> str | None:
        p = self.path / RECIPE_FILE
        return p.read_text() if p.is_file() else None

    def report(self) -> dict | None:
        p = self.path / REPORT_FILE
        return json.loads(p.read_text()) if p.is_file() else None

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def read_artifact(path: str | Path) -> Artifact:
    """Open and validate an artifact directory (metadata, index, shard headers) without reading tensors."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact '{path}': no such directory")
    config = _read_json(path / "config.json", path)
    quant = TealQuantConfig.from_dict(config.get("quantization_config"), where=f"artifact '{path}': config.json")
    from safetensors import safe_open

    if not (path / INDEX_FILE).is_file() and (path / SINGLE_FILE).is_file():
        # transformers' save_pretrained writes one unindexed file when the model fits in one shard
        try:
            with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
                weight_map = {name: SINGLE_FILE for name in f.keys()}
        except Exception as e:
            raise ArtifactError(f"artifact '{path}': {SINGLE_FILE} is corrupt or truncated ({first_line(e)})") from None
    else:
        index = _read_json(path / INDEX_FILE, path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ArtifactError(f"artifact '{path}': {INDEX_FILE} has no weight_map")

    for file in sorted(set(weight_map.values())):
        shard = path / file
        if not shard.is_file():
            raise ArtifactError(f"artifact '{path}': shard {file} is missing")
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys = set(f.keys())
        except Exception as e:
            raise ArtifactError(f"artifact '{path}': shard {file} is corrupt or truncated ({first_line(e)})") from None
        missing = [n for n, fl in weight_map.items() if fl == file and n not in keys]
        if missing:
            raise ArtifactError(f"artifact '{path}': shard {file} lacks tensor {missing[0]}")
    artifact = Artifact(path=path, config=config, quant=quant, weight_map=weight_map)
    for module in artifact.quantized_modules():
        if (linear_key(module, PERM_SUFFIX) in weight_map) != quant.act_order:
            problem = "is missing (act_order is true)" if quant.act_order else "is present but act_order is not set"
            raise ArtifactError(f"artifact '{path}': tensor {linear_key(module, PERM_SUFFIX)} {problem}")
    _check_channel_scales(artifact)
    return artifact


def check_perm(perm: torch.Tensor, in_features: int, where: str) -> None:
    """P.perm must be an int32 permutation of 0..K-1 (y = x[..., perm] @ W^T_stored)."""
    if perm.dtype != torch.int32 or tuple(perm.shape) != (in_features,):
        raise ArtifactError(f"{where}: must be int32 [{in_features}], got {perm.dtype} {tuple(perm.shape)}")
    if not torch.equal(torch.sort(perm.long()).values, torch.arange(in_features, device=perm.device)):
        raise ArtifactError(f"{where}: is not a permutation of 0..{in_features - 1}")


def _check_channel_scales(artifact: Artifact) -> None:
    """P.channel_scale exists, as float32 [K], exactly for the quantized linears of a weight-aware artifact.

    Reads shard headers only; the values (finite, >= 0) are checked when the tensors are loaded.
    """
    from safetensors import safe_open

    weight_aware = artifact.quant.criterion == "weight_aware"
    wanted = {linear_key(m, CHANNEL_SCALE_SUFFIX): m for m in artifact.quantized_modules()} if weight_aware else {}
    present = {n for n in artifact.weight_map if linear_of(n, CHANNEL_SCALE_SUFFIX) is not None}
    where = f"artifact '{artifact.path}'"
    extra, missing = sorted(present - set(wanted)), sorted(set(wanted) - present)
    if extra:
        raise ArtifactError(f"{where}: tensor {extra[0]} present but sparsity.criterion is {artifact.quant.criterion!r}")
    if missing:
        raise ArtifactError(f"{where}: tensor {missing[0]} is missing (sparsity.criterion is weight_aware)")
    headers = {}  # name -> (dtype, shape) of the channel scales and their qweights, one open per shard
    names = set(wanted) | {linear_key(m, "qweight") for m in wanted.values()}
    for file in sorted({artifact.weight_map[n] for n in names}):
        with safe_open(str(artifact.path / file), framework="pt") as f:
            for n in names:
                if artifact.weight_map[n] == file:
                    info = f.get_slice(n)
                    headers[n] = (info.get_dtype(), list(info.get_shape()))
    for name, module in sorted(wanted.items()):
        k = headers[linear_key(module, "qweight")][1][0]
        dtype, shape = headers[name]
        if dtype != "F32" or shape != [k]:
            raise ArtifactError(f"{where}: {name} must be float32 [{k}], got {dtype} {shape}")


def _read_json(file: Path, artifact: Path) -> dict:
    if not file.is_file():
        raise ArtifactError(f"artifact '{artifact}': {file.name} is missing")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"artifact '{artifact}': {file.name} is not valid JSON ({first_line(e)})") from None

