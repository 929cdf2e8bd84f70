"""The recipe schema: every option of a run, its default and its validation, in one place.

A recipe is data (YAML); the pipeline is code. Unknown keys are errors so that a typo never silently
falls back to a default. Every validation error is reported as one line naming the YAML path of the
field, e.g. ``sparsity.levels[2]: must be in [0, 1)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from teal_quant.errors import RecipeError

RECIPE_VERSION = 1
FORMAT_KEYS = ("bits", "group_size", "sym")  # quantization keys that from_checkpoint takes from the checkpoint


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Section):
    """The base model: a Hub repo id or a local directory (optionally a GGUF file inside it)."""

    source: str = Field(min_length=1)
    gguf_file: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # the base model's Hub repo id, for the model card's `base_model` metadata when `source` is a local directory or
    # `package:NAME` (a Hub id source names itself)
    base_model: str | None = None
    # a Hub source's safetensors shards are downloaded one by one as the layers need them; false: each shard this run
    # downloaded is deleted from the cache once its layers are done (a 70B model on a 64 GB disk)
    keep_download: bool = True

    @field_validator("base_model")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        from teal_quant.artifact.card import is_repo_id

        if v is not None and not is_repo_id(v):
            raise ValueError(f"'{v}' is not a Hub model id (namespace/name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
        return v


class TextFilesSource(_Section):
    """Plain-text files (paths or globs, relative to the working directory)."""

    kind: Literal["text_files"]
    paths: list[str] = Field(min_length=1)


class HFDatasetSource(_Section):
    """A text column of a Hugging Face dataset (needs the `datasets` package and Hub access)."""

    kind: Literal["hf_dataset"]
    name: str = Field(min_length=1)
    config: str | None = None
    split: str = "train"
    column: str = "text"


class GeneratedSource(_Section):
    """Text sampled from the model itself (seeded): calibration without any dataset."""

    kind: Literal["generated"]
    temperature: float = Field(default=1.0, gt=0)
    top_k: int = Field(default=50, ge=0)
    prompt: str = ""


TextSource = Annotated[Union[TextFilesSource, HFDatasetSource, GeneratedSource], Field(discriminator="kind")]


class CalibrationSpec(_Section):
    source: TextSource
    samples: int = Field(default=32, ge=1, le=100_000)
    seq_len: int = Field(default=512, ge=8, le=131_072)
    seed: int = 0


class GPTQSpec(_Section):
    """GPTQ options (quantization.method: gptq): columns per lazy-update block, dampening as a fraction of the mean
    Hessian diagonal, act-order (static groups), and how many calibration samples build the Hessians (null: all)."""

    block_size: int = Field(default=128, ge=1)
    damp: float = Field(default=0.01, gt=0, lt=1)
    act_order: bool = False
    samples: int | None = Field(default=None, ge=1)


class QuantizationSpec(_Section):
    """`from_checkpoint`: model.source is an existing GPTQ checkpoint; its codes are kept as they are and bits,
    group_size and sym come from it (setting different ones is an error)."""

    method: Literal["rtn", "gptq", "from_checkpoint"] = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    gptq: GPTQSpec | None = None
    sparsity_aware: float | None = None  # a positive level of sparsity.levels: GPTQ sees inputs thresholded at it
    # the output projection: dense (float, as the base model has it), or quantized with RTN at 8 / 4 bits (group_size
    # and sym of this section; a tied head gets its own quantized copy, the embedding stays float). No threshold.
    lm_head: Literal["dense", "int8", "int4"] = "dense"

    @model_validator(mode="before")
    @classmethod
    def _gptq_block(cls, data: Any) -> Any:
        """method gptq without a `gptq:` block gets the defaults; a `gptq:` block under another method is an error."""
        if isinstance(data, dict):
            method = data.get("method", "rtn")
            if method == "gptq" and data.get("gptq") is None:
                data = {**data, "gptq": {}}
            elif method != "gptq" and data.get("gptq") is not None:
                raise _FieldError("gptq", f"only applies to method gptq (method is {method})")
            if method != "gptq" and data.get("sparsity_aware") is not None:
                raise _FieldError("sparsity_aware", f"only applies to method gptq (method is {method})")
        return data

    def quantizer_options(self) -> dict[str, Any]:
        """Keyword options of the method's quantizer (quantize.QUANTIZERS): none for rtn."""
        if self.gptq is None:
            return {}
        return {"block_size": self.gptq.block_size, "damp": self.gptq.damp, "act_order": self.gptq.act_order}

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (4, 8):
            raise ValueError(f"must be 4 or 8, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and (v < 8 or v & (v - 1)):
            raise ValueError(f"must be a power of two >= 8, or -1 for per-channel, got {v}")
        return v


class GreedySpec(_Section):
    """TEAL's block-wise greedy search: step size, how many calibration tokens each block error uses (the error counts
    the last fraction of each sequence), and which candidates each step measures (search: "lazy" re-measures only
    the promising ones, "exact" all of them; see calibrate.allocation.greedy_allocation)."""

    step: float = Field(default=0.05, gt=0, le=0.5)
    tokens: int = Field(default=2048, ge=16)
    last_fraction: float = Field(default=0.25, gt=0, le=1)
    search: Literal["lazy", "exact"] = "lazy"


class SparsitySpec(_Section):
    method: Literal["teal"] = "teal"
    levels: list[float] = Field(default_factory=lambda: [0.25, 0.4, 0.5], min_length=1)
    default: float = 0.4
    allocation: Literal["greedy", "uniform"] = "greedy"
    # magnitude: keep x_k when |x_k| > t (TEAL); weight_aware: when |x_k| * ||W[:, k]||_2 > t (WINA)
    criterion: Literal["magnitude", "weight_aware"] = "magnitude"
    greedy: GreedySpec = GreedySpec()
    prefill: Literal["dense", "sparse"] = "dense"

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        for i, level in enumerate(v):
            if not 0 <= level < 1:
                raise _ItemError(i, "must be in [0, 1)")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("must be strictly increasing")
        return v

    @model_validator(mode="after")
    def _default_in_levels(self) -> "SparsitySpec":
        if self.default != 0 and not any(abs(self.default - lv) < 1e-9 for lv in self.levels):
            raise _FieldError("default", f"{self.default} is not one of levels {self.levels}")
        return self

    @property
    def all_levels(self) -> list[float]:
        """The artifact's level table: 0 (quantized, dense activations) first, then the recipe's levels."""
        return [0.0] + [lv for lv in self.levels if lv > 0]


class OutputSpec(_Section):
    dir: str = "outputs/artifact"
    max_shard_size: str = "2GB"
    overwrite: bool = False

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


class EvalSpec(_Section):
    """Optional perplexity evaluation at the end of a run (each level), on text never used to calibrate."""

    source: TextSource
    tokens: int = Field(default=16_384, ge=16)
    window: int = Field(default=1024, ge=8)


class RuntimeSpec(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # the calibration hidden states between layers (one buffer, samples x seq_len x hidden): their dtype (auto: the
    # compute dtype; bfloat16 halves the buffer) and where they live (memory, or disk: two files in the staging
    # folder, read and written a batch at a time)
    hidden_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    hidden_storage: Literal["memory", "disk"] = "memory"


class HubSpec(_Section):
    """Optional: push the artifact to a Hub model repo after a successful run. The token is never part of a recipe
    (recipes are shared and copied into the artifact): it comes from HF_TOKEN or `hf auth login`."""

    repo_id: str = Field(min_length=1)
    private: bool = True
    revision: str | None = None
    endpoint: str | None = None
    delete_extra: bool = False  # also delete remote files the artifact lacks (default: leave them, e.g. an edited README)

    @model_validator(mode="before")
    @classmethod
    def _no_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and "token" in data:
            raise _FieldError("token", "a token must not be written in a recipe; set HF_TOKEN or run `hf auth login`")
        return data


class Recipe(_Section):
    """A whole run: model -> calibration -> quantization + sparsity -> artifact (-> eval)."""

    version: Literal[1] = RECIPE_VERSION
    name: str | None = None
    model: ModelSpec
    calibration: CalibrationSpec
    quantization: QuantizationSpec = QuantizationSpec()
    sparsity: SparsitySpec = SparsitySpec()
    output: OutputSpec = OutputSpec()
    eval: EvalSpec | None = None
    runtime: RuntimeSpec = RuntimeSpec()
    hub: HubSpec | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        q = self.quantization
        if q.sparsity_aware is not None:
            positive = [lv for lv in self.sparsity.levels if lv > 0]
            if not any(abs(q.sparsity_aware - lv) < 1e-9 for lv in positive):
                raise _FieldError("quantization.sparsity_aware",
                                  f"{q.sparsity_aware} is not one of the positive sparsity.levels {positive}")
        if q.gptq is not None and q.gptq.samples is not None and q.gptq.samples > self.calibration.samples:
            raise _FieldError("quantization.gptq.samples",
                              f"{q.gptq.samples} is more than calibration.samples ({self.calibration.samples})")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        """Read and validate a recipe file; any problem raises RecipeError with one clear line."""
        return cls.from_dict(cls.read_yaml_data(path), origin=str(path))

    @staticmethod
    def read_yaml_data(path: str | Path) -> dict[str, Any]:
        """A recipe file's YAML mapping, not yet validated (teal_quant.compress merges overrides into it first)."""
        from teal_quant.errors import quote

        path = Path(path)
        try:
            if path.is_dir():
                raise RecipeError(f"{quote(path)}: is a directory, not a recipe file")
            data = path.read_bytes()
        except FileNotFoundError:
            raise RecipeError(f"{quote(path)}: recipe file not found") from None
        except OSError as e:  # a name too long for the file system, permissions, ...
            raise RecipeError(f"{quote(path)}: cannot read recipe ({e.strerror})") from None
        if b"\x00" in data:
            raise RecipeError(f"{quote(path)}: a binary file, not a YAML recipe")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"{quote(path)}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
        return Recipe._yaml_mapping(text, str(path))

    @classmethod
    def from_yaml_text(cls, text: str, origin: str = "<recipe>") -> "Recipe":
        return cls.from_dict(cls._yaml_mapping(text, origin), origin=origin)

    @staticmethod
    def _yaml_mapping(text: str, origin: str) -> dict[str, Any]:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise RecipeError(f"{origin}: malformed YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{origin}: a recipe must be a YAML mapping, got {type(data).__name__}")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<recipe>") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{origin}: a recipe must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(f"{origin}: {format_validation_error(e)}") from None

    def to_yaml(self) -> str:
        """The recipe with every default spelled out (the artifact's recipe.yaml), except the format keys a
        from_checkpoint recipe leaves out: they mean "the checkpoint's", so the file reads back as the same recipe."""
        data = self.model_dump(mode="json")
        q = self.quantization
        if q.method == "from_checkpoint":
            for key in FORMAT_KEYS:
                if key not in q.model_fields_set:
                    del data["quantization"][key]
        return yaml.safe_dump(data, sort_keys=False)


class _ItemError(ValueError):
    """A validation error about one item of a list field: reported as field[index]."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index
        self.message = message


class _FieldError(ValueError):
    """A model-level validation error about one named field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _yaml_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def format_validation_error(error: ValidationError) -> str:
    """The first problem of a pydantic error as `yaml.path: message` (one line)."""
    first = error.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    # Drop the discriminator tag pydantic inserts for tagged unions (e.g. `source.text_files.paths`).
    loc = tuple(p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "source" and p in _SOURCE_KINDS))
    ctx_error = (first.get("ctx") or {}).get("error")
    msg = first["msg"]
    if isinstance(ctx_error, _ItemError):
        loc, msg = loc + (ctx_error.index,), ctx_error.message
    elif isinstance(ctx_error, _FieldError):
        loc, msg = loc + (ctx_error.field,), ctx_error.message
    elif first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "is required"
    elif first["type"] == "union_tag_invalid":
        msg = f"kind must be one of {', '.join(_SOURCE_KINDS)}"
    elif first["type"] == "union_tag_not_found":
        msg = f"needs a 'kind' ({', '.join(_SOURCE_KINDS)})"
    msg = re.sub(r"^Value error, ", "", msg)
    return f"{_yaml_path(loc)}: {msg}"


_SOURCE_KINDS = ("text_files", "hf_dataset", "generated")

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'2GB' / '500MiB' / 1000000 -> bytes (the units huggingface_hub's max_shard_size accepts)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"'{text}' is not a size like 2GB or 500MiB")
    value = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()]
    if value < 1:
        raise ValueError(f"'{text}' must be positive")
    return int(value)


def convert_gptq_recipe(source: str, output: str | Path, *, levels: list[float], default: float,
                        calibration: list[str] | None = None, allocation: str = "greedy", device: str = "auto",
                        overwrite: bool = False) -> Recipe:
    """The recipe `teal-quant convert-gptq` runs: a GPTQ checkpoint kept as is (method from_checkpoint) plus TEAL
    thresholds, calibrated on the given text files or, like the default recipe, on text the model samples itself."""
    if calibration:
        cal: dict[str, Any] = {"source": {"kind": "text_files", "paths": list(calibration)}}
    else:
        cal = {"source": {"kind": "generated"}, "samples": 16, "seq_len": 256}
    data = {
        "name": f"{Path(source.rstrip('/')).name}-teal",
        "model": {"source": source},
        "calibration": cal,
        "quantization": {"method": "from_checkpoint"},
        "sparsity": {"levels": levels, "default": default, "allocation": allocation},
        "output": {"dir": str(output), "overwrite": overwrite},
        "runtime": {"device": device},
    }
    return Recipe.from_dict(data, origin="convert-gptq")
