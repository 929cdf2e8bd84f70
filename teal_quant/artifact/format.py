"""The on-disk artifact (format_version 1): the only code that knows file names, tensor keys and metadata.

An artifact is a Hugging Face model directory: config.json with a `quantization_config` of
quant_method "teal_quant", sharded safetensors with an index, tokenizer files, recipe.yaml, a
calibration report and a model card. docs/artifact-format.md is the human-readable spec.
It is written into a temporary directory beside the destination and renamed only when complete, so an
interrupted run never leaves a half-written artifact under the final name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from teal_quant import __version__
from teal_quant.architecture import CRITERIA, LAYERS_PREFIX
from teal_quant.errors import ArtifactError, first_line

logger = logging.getLogger(__name__)

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
# A quantized lm_head (quantization_config.lm_head, recipe quantization.lm_head: int8 | int4) is stored like a
# quantized linear without thresholds: lm_head.qweight, lm_head.scales, lm_head.zeros (no lm_head.weight), and the
# artifact's config.json says tie_word_embeddings: false (the embedding stays in float, the head is its own tensor).
HEAD_MODULE = "lm_head"
HEAD_SUFFIXES = ("qweight", "scales", "zeros")
HEAD_FORMATS = {"dense": None, "int8": 8, "int4": 4}  # recipe value -> bits


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
    lm_head_bits: int | None = None  # None: lm_head dense (float, or the tied embedding); 4 | 8: lm_head.qweight...
    lm_head_group_size: int | None = None  # with lm_head_bits; -1: per-channel

    @property
    def packing(self) -> str:
        return PACKING[self.bits]

    @property
    def head_quantized(self) -> bool:
        return self.lm_head_bits is not None

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def level_index(self, level: float) -> int:
        for i, lv in enumerate(self.levels):
            if abs(lv - level) < 1e-6:
                return i
        raise ValueError(f"sparsity level {level} is not in this artifact (levels: {', '.join(map(str, self.levels))})")

    def to_dict(self) -> dict:
        extra = {"act_order": True} if self.act_order else {}  # written only when true: older readers see no change
        if self.head_quantized:  # written only for a quantized head (a dense head: no key, as before)
            extra["lm_head"] = {"bits": self.lm_head_bits, "group_size": self.lm_head_group_size,
                                "packing": PACKING[self.lm_head_bits]}
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
        version = d.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise ArtifactError(f"{where}: format_version {d.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
        for key in ("bits", "group_size"):
            if key in d and type(d[key]) is not int:
                raise ArtifactError(f"{where}: {key} must be an integer, got {d[key]!r}")
        sp = d.get("sparsity")
        if isinstance(sp, dict):
            values = [*(sp.get("levels") or []), sp.get("default", 0.0)]
            if any(type(v) not in (int, float) or not math.isfinite(v) for v in values):
                raise ArtifactError(f"{where}: sparsity levels and default must be finite numbers")
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
                **_head_fields(d.get("lm_head"), where),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: quantization_config is incomplete ({first_line(e)})") from None
        if cfg.group_size != -1 and (cfg.group_size <= 0 or cfg.group_size & (cfg.group_size - 1)):
            raise ArtifactError(f"{where}: group_size {cfg.group_size} must be a positive power of two or -1 (per-channel)")
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


def _head_fields(head, where: str) -> dict:
    """quantization_config.lm_head ({bits, group_size, packing}, or absent: a dense head) -> config fields."""
    if head is None:
        return {}
    if not isinstance(head, dict) or type(head.get("bits")) is not int or type(head.get("group_size")) is not int:
        raise ArtifactError(f"{where}: lm_head must be {{bits, group_size, packing}} with integer bits and group_size, "
                            f"got {head!r}")
    bits, group = head["bits"], head["group_size"]
    if bits not in PACKING or head.get("packing") != PACKING[bits]:
        raise ArtifactError(f"{where}: lm_head bits {bits} / packing {head.get('packing')!r} not supported")
    if group != -1 and (group <= 0 or group & (group - 1)):
        raise ArtifactError(f"{where}: lm_head group_size {group} must be a positive power of two or -1 (per-channel)")
    return {"lm_head_bits": bits, "lm_head_group_size": group}


STAGED_MARK = ".partial-"  # .NAME.partial-XXXX: a run's staging folder beside its destination
ASIDE_MARK = ".old-"  # .NAME.old-XXXX: an artifact moved aside by --overwrite, removed once the new one is in place
OWNER_FILE = ".teal-quant-writer.json"  # in a staging folder: the pid and host of the run that writes it
RESUME_DIR = ".resume"  # in a staging folder: what `--resume` continues from (removed before the final rename)
RESUME_STATE = "state.json"  # in RESUME_DIR: the shards written, the spilled pending tensors, the caller's progress
RESUME_VERSION = 1


class DestinationError(ArtifactError):
    """The output path cannot be written (exists, is not an artifact, is the model source, parent not writable...)."""


def is_artifact_dir(path: Path) -> bool:
    """A teal-quant artifact, the only thing --overwrite may replace: a real directory (not a symlink) whose config.json
    has quantization_config.quant_method teal_quant, with its weights (index or model.safetensors) and only files."""
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        config = json.loads((path / "config.json").read_text())
        entries = list(path.iterdir())
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return False
    if not ((path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()):
        return False
    return all(e.is_file() and not e.is_symlink() for e in entries)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def check_destination(destination: str | Path, *, overwrite: bool, sources: Iterable[str | Path] = ()) -> Path:
    """Every rule on an output path, checked before any work starts; returns the resolved path.

    Refused (DestinationError, one line): the destination is, contains or lies inside a model source; its parent is
    a file or not writable; it exists and overwrite is off; it exists, overwrite is on, and it is not a teal-quant
    artifact (is_artifact_dir): --overwrite never replaces a user's folder or file."""
    raw = Path(destination).expanduser()
    try:
        dest = raw.resolve()
    except (OSError, RuntimeError) as e:
        raise DestinationError(f"output '{raw}': cannot be resolved ({first_line(e)})") from None
    for source in sources:
        src = Path(source).expanduser().resolve()
        if dest == src or src in dest.parents or dest in src.parents:
            raise DestinationError(f"output '{dest}' is the model source or overlaps it ('{src}'); choose another output")
    if dest.parent == dest:
        raise DestinationError(f"output '{dest}': not a folder an artifact can be written to")
    ancestor = dest.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DestinationError(f"output '{dest}': '{ancestor}' is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DestinationError(f"output '{dest}': '{ancestor}' is not writable")
    if raw.is_symlink() or dest.exists():
        if not overwrite:
            raise DestinationError(f"output '{dest}' already exists (set output.overwrite: true or pass --overwrite)")
        if not is_artifact_dir(raw if raw.is_symlink() else dest):
            kind = "a file" if dest.is_file() else "a symlink" if raw.is_symlink() else "a folder that is not a teal-quant artifact"
            raise DestinationError(f"output '{dest}' is {kind}; --overwrite replaces only a teal-quant artifact, "
                                   "remove it yourself or choose another output")
    return dest


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def stale_partials(destination: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Staging / aside folders of `destination` left by earlier runs: (removable: their writer, on this host, is no
    longer running), (kept: with why: the writer may still be running, or the folder names no writer)."""
    removable, kept = [], []
    prefixes = (f".{destination.name}{STAGED_MARK}", f".{destination.name}{ASIDE_MARK}")
    try:
        entries = list(destination.parent.iterdir())
    except OSError:
        return [], []
    for p in sorted(entries):
        if not p.name.startswith(prefixes) or p.is_symlink() or not p.is_dir():
            continue
        if (p / RESUME_DIR / RESUME_STATE).is_file() and _writer_gone(p):
            kept.append((p, "it holds an interrupted run's finished layers (teal-quant run --resume continues it)"))
            continue
        try:
            owner = json.loads((p / OWNER_FILE).read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            kept.append((p, "it names no writing process"))
            continue
        if host == socket.gethostname() and not _pid_alive(pid):
            removable.append(p)
        else:
            kept.append((p, f"process {pid} on {host} may still be writing it"))
    return removable, kept


def _writer_gone(partial: Path) -> bool:
    """The run that wrote this staging folder is over: it released it (an exception kept its finished layers), or it
    was a process on this host that is no longer running (SIGKILL, a crash)."""
    try:
        owner = json.loads((partial / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(owner, dict):
        return False
    if owner.get("released"):
        return True
    try:
        pid, host = int(owner["pid"]), str(owner["host"])
    except (KeyError, TypeError, ValueError):
        return False
    return host == socket.gethostname() and not _pid_alive(pid)


@dataclass
class Resumable:
    """A staging folder an interrupted run left with finished work: its path and its resume state."""

    path: Path
    state: dict

    @property
    def summary(self) -> str:
        return str(self.state.get("summary") or "finished work")


def resumable_partials(destination: Path) -> list[Resumable]:
    """Staging folders of `destination` whose run is over and that hold a resume state, newest first."""
    out = []
    prefix = f".{destination.name}{STAGED_MARK}"
    try:
        entries = list(destination.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        state_file = p / RESUME_DIR / RESUME_STATE
        if not p.name.startswith(prefix) or p.is_symlink() or not state_file.is_file() or not _writer_gone(p):
            continue
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("version") == RESUME_VERSION:
            out.append(Resumable(p, state))
    return sorted(out, key=lambda r: (r.path / RESUME_DIR / RESUME_STATE).stat().st_mtime, reverse=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_RENAME_NOREPLACE = 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` only if nothing is at `dst` (Linux renameat2 RENAME_NOREPLACE; elsewhere a check right
    before os.rename, which cannot replace a non-empty folder). FileExistsError when something is there."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        AT_FDCWD = -100
        rc = renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS):  # file systems without the flag fall through
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


class ArtifactWriter:
    """Streams tensors into size-bounded shards inside a staging folder beside the destination; `commit()` moves it
    into place in one rename that never replaces what it did not expect (docs/safety.md).

    The destination rules (check_destination) run first, before anything is written; staging folders of the same
    destination left by a killed run are removed when their process is gone, and reported otherwise (`notes`)."""

    def __init__(self, destination: Path, *, max_shard_size: int, overwrite: bool = False,
                 sources: Iterable[str | Path] = (), fingerprint: dict[str, str] | None = None, resume: bool = False):
        self.destination = check_destination(destination, overwrite=overwrite, sources=sources)
        self.overwrite = overwrite
        self._expected = _identity(self.destination)  # what commit may replace: exactly this folder, or nothing
        self.notes: list[str] = []
        self.fingerprint = fingerprint  # set: the run checkpoints (`checkpoint`) and can be resumed
        self.resumed: dict | None = None  # the caller's progress of the run this writer continues (--resume)
        self.kept_partial: Path | None = None  # where an interrupted run's finished work was kept (abort)
        self.max_shard_size = max_shard_size
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._spills: list[tuple[str, list[str]]] = []  # RESUME_DIR files holding tensors still pending
        self._unspilled: list[str] = []  # pending tensors added since the last checkpoint
        self._progress: dict | None = None
        self._summary = ""
        self._final: dict[str, str] | None = None  # staged shard name -> final name, once finish_tensors started
        self.total_bytes = 0
        self._finished = False
        self._umask = _umask()
        removable, kept = stale_partials(self.destination)
        for p in removable:
            shutil.rmtree(p, ignore_errors=True)
            self.notes.append(f"removed '{p}', left by an earlier run that was killed")
            logger.warning(self.notes[-1])
        resumables = resumable_partials(self.destination)
        if resume:
            self._adopt(resumables)
            return
        if resumables:
            r = resumables[0]
            raise DestinationError(f"output '{self.destination}': an interrupted run left {r.summary} in '{r.path}'; "
                                   "continue it with --resume, or delete that folder to start over")
        for p, why in kept:  # possibly a live run's: said with --verbose, so a failing run's stderr stays one line
            self.notes.append(f"'{p}' is left from another run ({why}); remove it once no run is writing it")
            logger.debug(self.notes[-1])
        self.destination.parent.mkdir(parents=True, exist_ok=True, mode=0o777)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}{STAGED_MARK}", dir=self.destination.parent))
        os.chmod(self.dir, 0o777 & ~self._umask)  # mkdtemp's 0700 -> what mkdir would give
        self._write_owner()

    def _write_owner(self, **extra) -> None:
        (self.dir / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), **extra}) + "\n")

    # ------------------------------------------------------------------ resume
    def _adopt(self, resumables: list[Resumable]) -> None:
        """--resume: continue the newest interrupted run of this destination, if its fingerprint is this run's."""
        if self.fingerprint is None:
            raise DestinationError("--resume: this command cannot resume")
        if not resumables:
            raise DestinationError(f"--resume: no interrupted run of '{self.destination}' to continue (no "
                                   f"'.{self.destination.name}{STAGED_MARK}*' folder with finished layers)")
        r = resumables[0]
        theirs = r.state.get("fingerprint") or {}
        for key, value in self.fingerprint.items():
            if theirs.get(key) != value:
                raise DestinationError(f"--resume: the interrupted run in '{r.path}' was made with a different {key} "
                                       "than this one; run it with the same ones, or delete that folder to start over")
        self.dir = r.path
        self._write_owner()
        state = r.state
        try:
            self._shards = [(str(name), [str(n) for n in names]) for name, names in state["shards"]]
            self._spills = [(str(name), [str(n) for n in names]) for name, names in state["spills"]]
            self.total_bytes = int(state["total_bytes"])
            self._final = state.get("final")
        except (KeyError, TypeError, ValueError):
            raise DestinationError(f"--resume: '{self.dir}' holds an unreadable resume state; delete it to start "
                                   "over") from None
        for name, _ in self._shards:
            staged, final = self.dir / name, self.dir / (self._final or {}).get(name, name)
            if not staged.is_file() and not final.is_file():
                raise DestinationError(f"--resume: '{self.dir}' lacks {name}, which its resume state lists; delete "
                                       "it to start over")
        from safetensors import safe_open

        for name, names in self._spills:
            try:
                with safe_open(str(self.dir / RESUME_DIR / name), framework="pt") as f:
                    for n in names:
                        t = f.get_tensor(n)
                        self._pending[n] = t
                        self._pending_bytes += t.numel() * t.element_size()
            except Exception as e:
                raise DestinationError(f"--resume: '{self.dir}': {name} is unreadable ({first_line(e)}); delete it "
                                       "to start over") from None
        self._progress, self._summary = state.get("progress") or {}, str(state.get("summary") or "")
        self.resumed = self._progress
        keep = set(state.get("files") or [])
        self._remove_strays(keep)
        if self._final is not None:
            self.finish_tensors()

    def _remove_strays(self, keep: set[str]) -> None:
        """Files an interrupted checkpoint or flush left half-written (listed in no state): they would only take disk."""
        listed = {name for name, _ in self._shards} | set((self._final or {}).values())
        for f in self.dir.glob("shard-*.safetensors"):
            if f.name not in listed:
                f.unlink()
        resume_dir = self.dir / RESUME_DIR
        wanted = {RESUME_STATE} | {name for name, _ in self._spills} | keep
        if resume_dir.is_dir():
            for f in resume_dir.iterdir():
                if f.name not in wanted and f.is_file():
                    f.unlink()

    def resume_file(self, name: str) -> Path:
        """A file of the caller's in the staging folder's RESUME_DIR (e.g. the hidden states a resume starts from)."""
        folder = self.dir / RESUME_DIR
        folder.mkdir(exist_ok=True)
        return folder / name

    def checkpoint(self, progress: dict, *, summary: str, files: Iterable[str] = ()) -> None:
        """Make everything added so far durable, with the caller's `progress` (JSON), so `--resume` can continue from
        here: tensors still pending are spilled to RESUME_DIR (only those added since the last checkpoint), then the
        state is replaced in one rename. `files`: the caller's RESUME_DIR files this state needs (others go)."""
        if self.fingerprint is None:
            raise RuntimeError("ArtifactWriter.checkpoint without a fingerprint")
        from safetensors.torch import save_file

        if self._unspilled:
            name = f"pending-{len(self._shards):05d}-{len(self._spills):05d}.safetensors"
            path = self.resume_file(name)
            save_file({n: self._pending[n] for n in self._unspilled}, str(path), metadata={"format": "pt"})
            _fsync(path)
            self._spills.append((name, list(self._unspilled)))
            self._unspilled = []
        self._progress, self._summary = progress, summary
        self._write_state(list(files))

    def _write_state(self, files: list[str]) -> None:
        state = {"version": RESUME_VERSION, "fingerprint": self.fingerprint, "summary": self._summary,
                 "shards": self._shards, "spills": self._spills, "total_bytes": self.total_bytes,
                 "final": self._final, "files": files, "progress": self._progress}
        tmp = self.resume_file(RESUME_STATE + ".tmp")
        tmp.write_text(json.dumps(state) + "\n")
        _fsync(tmp)
        os.replace(tmp, self.dir / RESUME_DIR / RESUME_STATE)
        self._remove_strays(set(files))

    # ------------------------------------------------------------------ tensors
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
            if self.fingerprint is not None:
                self._unspilled.append(name)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.dir / name), metadata={"format": "pt"})
        if self.fingerprint is not None:
            _fsync(self.dir / name)
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0
        self._spills, self._unspilled = [], []  # all in the shard now; their files go at the next checkpoint

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
        if self._final is None:
            self._final = {tmp: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, (tmp, _) in enumerate(self._shards)}
            if self.fingerprint is not None and self._progress is not None:  # a resume after this point renames again
                self._write_state(self._state_files())
        weight_map = {}
        for tmp_name, names in self._shards:
            final = self._final[tmp_name]
            if (self.dir / tmp_name).is_file():
                os.replace(self.dir / tmp_name, self.dir / final)
            weight_map.update({t: final for t in names})
        self.write_json(INDEX_FILE, {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        self._finished = True
        return self.dir

    def _state_files(self) -> list[str]:
        try:
            return list(json.loads((self.dir / RESUME_DIR / RESUME_STATE).read_text()).get("files") or [])
        except (OSError, ValueError):
            return []

    def commit(self) -> Path:
        """Finish the tensors (if not done yet), then move the folder into place in one rename.

        Without overwrite it is renamed only onto nothing; with overwrite it replaces only the artifact checked when
        the writer was made (same inode, still an artifact), which is moved aside first and removed only once the new
        one is in place. Anything else at the destination is left alone: DestinationError, and the new artifact is
        kept under a name the message gives."""
        self.finish_tensors()
        shutil.rmtree(self.dir / RESUME_DIR, ignore_errors=True)  # an artifact holds files only
        self._chmod_files()
        dest = self.destination
        current = _identity(dest)
        if current is not None:
            if self._expected is None or current != self._expected or not is_artifact_dir(dest):
                self._keep("appeared while this run was going" if self._expected is None else
                           "was replaced while this run was going")
            aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}{ASIDE_MARK}", dir=dest.parent))
            (aside / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
            try:
                os.rename(dest, aside / "artifact")
            except OSError as e:
                shutil.rmtree(aside, ignore_errors=True)
                self._keep(f"could not be moved aside ({first_line(e)})")
            try:
                rename_noreplace(self.dir, dest)
            except OSError:
                try:  # someone put something there in between: put the old artifact back if we can
                    rename_noreplace(aside / "artifact", dest)
                    shutil.rmtree(aside, ignore_errors=True)
                except OSError:
                    pass
                self._keep("appeared while this run was going")
            shutil.rmtree(aside, ignore_errors=True)
        else:
            try:
                rename_noreplace(self.dir, dest)
            except FileExistsError:
                self._keep("appeared while this run was going")
        (dest / OWNER_FILE).unlink(missing_ok=True)
        return dest

    def _chmod_files(self) -> None:
        mode = 0o666 & ~self._umask
        for f in self.dir.iterdir():
            if f.is_file() and f.name != OWNER_FILE:
                os.chmod(f, mode)

    def _keep(self, what: str) -> None:
        """Something unexpected is at the destination: leave it, keep the new artifact under a visible name, raise."""
        kept = self.destination.with_name(f"{self.destination.name}.teal-quant-{os.getpid()}")
        try:
            rename_noreplace(self.dir, kept)
            (kept / OWNER_FILE).unlink(missing_ok=True)
        except OSError:
            kept = self.dir
            (kept / OWNER_FILE).unlink(missing_ok=True)  # no owner: the next run reports it, never removes it
        self.dir = kept
        self._kept = True
        raise DestinationError(f"output '{self.destination}' {what}; it was left as it is and the new artifact is "
                               f"complete at '{kept}'")

    def abort(self) -> None:
        """The run failed or was stopped: a staging folder with checkpointed work is kept for --resume (released, so
        the next run sees whose it was); anything else is removed."""
        if getattr(self, "_kept", False):
            return
        if self.fingerprint is not None and (self.dir / RESUME_DIR / RESUME_STATE).is_file():
            try:
                self._write_owner(released=True)
                self.kept_partial = self.dir
                return
            except OSError:  # a full disk: the old owner file still names this (soon dead) process
                self.kept_partial = self.dir
                return
        shutil.rmtree(self.dir, ignore_errors=True)

    def kept_note(self) -> str:
        """What an interrupted run kept, for its error line ('' when nothing was kept)."""
        if self.kept_partial is None:
            return ""
        return (f"{self._summary or 'finished work'} kept in '{self.kept_partial}': continue with "
                "`teal-quant run RECIPE --resume`")

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
        """The TealLinear projections (every linear with a .qweight but a quantized lm_head)."""
        return sorted(m for m in (linear_of(n, "qweight") for n in self.weight_map) if m not in (None, HEAD_MODULE))

    def recipe_text(self) -> str | None:
        p = self.path / RECIPE_FILE
        return p.read_text() if p.is_file() else None

    def report(self) -> dict | None:
        """The calibration report (None when the artifact has none); malformed JSON is an ArtifactError."""
        p = self.path / REPORT_FILE
        return _read_json(p, self.path) if p.is_file() else None

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def shard_path(folder: Path, name: object, where: str, error: type[Exception] = ArtifactError) -> Path:
    """The file an index's weight_map names, refused unless it lies inside `folder`: a relative path without `..`,
    whose target after resolving symlinks is in the folder (or, for a huggingface_hub snapshot, in the same repo's
    blobs/ folder, where the cache keeps the files the snapshot links to). One check for artifacts and base models."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{where}: {INDEX_FILE} names a shard {name!r} that is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or name.startswith("~"):
        raise error(f"{where}: {INDEX_FILE} names shard '{name}' outside the folder; refused")
    path = folder / rel
    root = folder.resolve()
    target = path.resolve()
    allowed = [root]
    if folder.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<rev>/file -> ../../blobs/<hash>
        allowed.append((folder.parent.parent / "blobs").resolve())
    if not any(target == a or a in target.parents for a in allowed):
        raise error(f"{where}: shard '{name}' resolves outside the folder ('{target}'); refused")
    return path


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
        if not (path / INDEX_FILE).is_file() and (any(path.glob("*.bin")) or any(path.glob("*.pt"))):
            raise ArtifactError(f"artifact '{path}': holds pickle weights (.bin/.pt) but no safetensors; a teal-quant "
                                "artifact is read from safetensors only")
        index = _read_json(path / INDEX_FILE, path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ArtifactError(f"artifact '{path}': {INDEX_FILE} has no weight_map")
    for file in set(weight_map.values()):
        shard_path(path, file, f"artifact '{path}'")

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
    _check_quantized_tensors(artifact)
    _check_quantized_head(artifact)
    _check_channel_scales(artifact)
    return artifact


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_QWEIGHT_DTYPE = {4: "I32", 8: "U8"}
_DTYPE_NAMES = {"I32": "int32", "U8": "uint8", "F32": "float32"}


def _headers(artifact: Artifact, names: Iterable[str]) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape), from the shard headers only (one open per shard)."""
    from safetensors import safe_open

    names = set(names)
    out = {}
    for file in sorted({artifact.weight_map[n] for n in names}):
        with safe_open(str(artifact.path / file), framework="pt") as f:
            for n in names:
                if artifact.weight_map[n] == file:
                    info = f.get_slice(n)
                    out[n] = (info.get_dtype(), list(info.get_shape()))
    return out


def _check_quantized_tensors(artifact: Artifact) -> None:
    """Every quantized linear, before anything is loaded: its four tensors present with the format's dtypes and
    consistent shapes (qweight int32 [K, N/8] for 4 bits, uint8 [K, N] for 8; scales and zeros floating [K/G, N] with
    G a power of two dividing K; thresholds float32 [len(levels)]), and finite scales and zeros (read one tensor at a
    time). One ArtifactError naming the tensor for the first problem."""
    from safetensors import safe_open

    quant, where = artifact.quant, f"artifact '{artifact.path}'"
    modules = artifact.quantized_modules()
    names = [linear_key(m, s) for m in modules for s in QUANT_SUFFIXES]
    missing = [n for n in names if n not in artifact.weight_map]
    if missing:
        raise ArtifactError(f"{where}: tensor {missing[0]} is missing")
    headers = _headers(artifact, names)
    per_word = 8 if quant.bits == 4 else 1
    for m in modules:
        name = linear_key(m, "qweight")
        dtype, shape = headers[name]
        want = _QWEIGHT_DTYPE[quant.bits]
        if dtype != want or len(shape) != 2 or 0 in shape:
            raise ArtifactError(f"{where}: {name} must be {_DTYPE_NAMES[want]} [K, N{'/8' if per_word > 1 else ''}] "
                                f"for {quant.bits}-bit weights, got {dtype} {shape}")
        k, n = shape[0], shape[1] * per_word
        g = quant.group_size_for(k)
        if k % g:
            raise ArtifactError(f"{where}: group_size {quant.group_size} does not divide in_features {k} of {name}")
        for suffix in ("scales", "zeros"):
            key = linear_key(m, suffix)
            dtype, shape = headers[key]
            if dtype not in _FLOAT_DTYPES or shape != [k // g, n]:
                raise ArtifactError(f"{where}: {key} must be floating [{k // g}, {n}], got {dtype} {shape}")
        key = linear_key(m, "thresholds")
        dtype, shape = headers[key]
        if dtype != "F32" or shape != [len(quant.levels)]:
            raise ArtifactError(f"{where}: {key} must be float32 [{len(quant.levels)}], got {dtype} {shape}")
    scale_names = [linear_key(m, s) for m in modules for s in ("scales", "zeros")]
    for file in sorted({artifact.weight_map[n] for n in scale_names}):
        with safe_open(str(artifact.path / file), framework="pt") as f:
            for key in scale_names:
                if artifact.weight_map[key] == file and not torch.isfinite(f.get_tensor(key)).all():
                    raise ArtifactError(f"{where}: {key} has non-finite values (inf or NaN)")


def _check_quantized_head(artifact: Artifact) -> None:
    """lm_head.qweight / scales / zeros exist exactly when quantization_config.lm_head says so, with the format's
    dtypes and the shapes of config.json's hidden_size x vocab_size, and no lm_head.weight beside them."""
    quant, where, weight_map = artifact.quant, f"artifact '{artifact.path}'", artifact.weight_map
    names = [linear_key(HEAD_MODULE, s) for s in HEAD_SUFFIXES]
    present = [n for n in names if n in weight_map]
    if not quant.head_quantized:
        if present:
            raise ArtifactError(f"{where}: tensor {present[0]} present but quantization_config has no lm_head")
        return
    missing = [n for n in names if n not in weight_map]
    if missing:
        raise ArtifactError(f"{where}: tensor {missing[0]} is missing (quantization_config.lm_head is set)")
    if LM_HEAD_KEY in weight_map:
        raise ArtifactError(f"{where}: tensor {LM_HEAD_KEY} present beside the quantized lm_head")
    hidden, vocab = artifact.config.get("hidden_size"), artifact.config.get("vocab_size")
    headers = _headers(artifact, names)
    bits = quant.lm_head_bits
    per_word = 8 if bits == 4 else 1
    dtype, shape = headers[names[0]]
    want = _QWEIGHT_DTYPE[bits]
    if dtype != want or len(shape) != 2 or [shape[0], shape[1] * per_word] != [hidden, vocab]:
        raise ArtifactError(f"{where}: {names[0]} must be {_DTYPE_NAMES[want]} [hidden_size {hidden}, vocab_size "
                            f"{vocab}{'/8' if per_word > 1 else ''}] for a {bits}-bit head, got {dtype} {shape}")
    group = hidden if quant.lm_head_group_size == -1 else quant.lm_head_group_size
    if hidden % group:
        raise ArtifactError(f"{where}: lm_head group_size {group} does not divide hidden_size {hidden}")
    for key in names[1:]:
        dtype, shape = headers[key]
        if dtype not in _FLOAT_DTYPES or shape != [hidden // group, vocab]:
            raise ArtifactError(f"{where}: {key} must be floating [{hidden // group}, {vocab}], got {dtype} {shape}")
    from safetensors import safe_open

    for key in names[1:]:
        with safe_open(str(artifact.path / weight_map[key]), framework="pt") as f:
            if not torch.isfinite(f.get_tensor(key)).all():
                raise ArtifactError(f"{where}: {key} has non-finite values (inf or NaN)")


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
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"artifact '{artifact}': {file.name} is not valid JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"artifact '{artifact}': {file.name} is not a JSON object")
    return data

