"""Several processes through torch.distributed (torchrun): who this process is, how the calibration sequences split
between ranks, and the few collectives the pipeline, tensor-parallel decoding and `bench --tp` need. In one process
(no torchrun, or WORLD_SIZE=1) every collective here is a no-op, so callers never branch on the world size.

- `init()` joins the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR/PORT): gloo for CPU tensors and, on a machine with GPUs, NCCL for CUDA tensors (one default group,
  "cpu:gloo,cuda:nccl"; each rank on cuda:LOCAL_RANK; NCCL connects on the first CUDA collective only), plus a gloo
  group with a long timeout for small control messages (agreements, the run's result), so waiting for rank 0 to
  write and evaluate the artifact never trips the data group's timeout. A group the caller made already is reused.
- `split(n)`: the global sequence indices this rank owns, strided (rank r: r, r + W, r + 2W, ...), so every prefix of
  the global sequences (the greedy search's tokens, GPTQ's samples) spreads evenly over the ranks: `local_count`.
- `all_reduce_` / `all_reduce_floats`: sums over the ranks (results are identical on every rank, so decisions taken
  from them, like the greedy search's, stay in lock-step).
- `agreement(what)`: a block every rank runs; when it raises on any rank, every rank raises (the first failing
  rank's error), and only rank 0 reports it: one line, exit 2 for bad input. Nothing hangs waiting for a rank that
  failed before a collective. Errors outside an agreement end that rank (one line naming it); torchrun then stops
  the others.

A leaf module: it imports torch and teal_quant.errors only.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from teal_quant.errors import TealQuantError, first_line

# Control messages may wait for rank 0 to write and evaluate a whole artifact (minutes to an hour at 70B).
CONTROL_TIMEOUT = datetime.timedelta(hours=6)
_AGREED = "_teal_quant_agreed"  # set on an exception every rank knows of: rank 0 reports it, the others stay quiet


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo", "cpu:gloo,cuda:nccl", "nccl" ...; None: one process
    group: Any = None  # the data process group (None: the default group)
    control: Any = None  # gloo group for agreements and objects

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def split(self, n: int) -> slice:
        """This rank's share of `n` global sequences: every size-th one, starting at its rank."""
        return slice(self.rank, n, self.size)

    def local_count(self, n_global: int) -> int:
        """How many of the first `n_global` global sequences this rank holds (they are its first ones)."""
        return len(range(self.rank, max(0, n_global), self.size))

    @property
    def world_size(self) -> int:
        return self.size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place (and returned); nothing to do in one process. A World is the
        reducer the layer-streaming loop takes, and `all_reduce` the `reduce` of the greedy search."""
        return all_reduce_(tensor, self)

    def local_device(self, device: torch.device) -> torch.device:
        """cuda -> cuda:LOCAL_RANK when distributed (one GPU per rank); the CPU stays the CPU."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device


SINGLE = World()
_world: World = SINGLE
_owned = False  # this module created the default group (and destroys it at exit)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    """RANK as torchrun sets it (0 when not launched by torchrun): which process prints, before `init`."""
    try:
        return int(os.environ.get("RANK", "0")) if env_world_size() > 1 else 0
    except ValueError:
        return 0


def current() -> World:
    """The world `init` joined (or the group the caller initialized), else one process."""
    global _world
    import torch.distributed as dist

    if _world is SINGLE and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _world = _wrap_existing(control_group=False)  # no collective here: control messages use the default group
    return _world


def init(device: torch.device | str | None = None) -> World:
    """Join the job torchrun started (idempotent; `device` only checks that a CUDA run has a GPU for this rank).
    One process: SINGLE."""
    global _world, _owned
    import torch.distributed as dist

    if _world is not SINGLE:
        return _world
    if dist.is_available() and dist.is_initialized():
        _world = _wrap_existing(control_group=dist.get_world_size() > 1) if dist.get_world_size() > 1 else SINGLE
        return _world
    size = env_world_size()
    if size <= 1:
        return SINGLE
    if not dist.is_available():
        raise TealQuantError(f"WORLD_SIZE={size}, but this torch build has no torch.distributed")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise TealQuantError(f"WORLD_SIZE={size} but {name} is not set: launch several processes with "
                                 "`torchrun --nproc-per-node N -m teal_quant.cli ...`")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is not None and torch.device(device).type == "cuda" and local_rank >= gpus:
        raise TealQuantError(f"LOCAL_RANK {local_rank}: only {gpus} CUDA device(s) here (one GPU per process: "
                             "--nproc-per-node at most the GPU count)")
    if local_rank < gpus:
        torch.cuda.set_device(local_rank)
    backend = "cpu:gloo,cuda:nccl" if local_rank < gpus else "gloo"
    dist.init_process_group(backend=backend)
    _owned = True
    atexit.register(shutdown)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _world = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, backend=backend,
                   group=None, control=control)
    return _world


def _wrap_existing(control_group: bool) -> World:
    """A default group the caller initialized; with `control_group` (every rank calls `init`) a gloo group for
    control messages is made beside an NCCL one."""
    import torch.distributed as dist

    backend = str(dist.get_backend())
    make = control_group and backend != "gloo"  # gloo alone: the default group carries the control messages too
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if make else None
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, backend=backend,
                 group=None, control=control)


def shutdown() -> None:
    """Leave the process group `init` created (nothing when the caller owns it, or in one process)."""
    global _world, _owned
    import torch.distributed as dist

    owned = _owned and dist.is_available() and dist.is_initialized()
    if owned:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _owned = False
    _world = SINGLE
    if owned:
        # destroy_process_group only forgets the groups: an error's traceback cycle can still hold one (World.control),
        # and a gloo group freed by the interpreter's last collection aborts the process ("terminate called without
        # an active exception", exit -6 instead of the error's exit code). Free them now, while the interpreter runs.
        gc.collect()


# ------------------------------------------------------------------------------------------------ collectives
class PeerLost(RuntimeError):
    """A collective failed because another rank stopped (its own error line says why)."""

    exit_code = 1


def _backend_device(world: World, tensor: torch.Tensor) -> torch.device:
    """Where a collective on `tensor` can run: where it is, unless the group lacks that device's backend."""
    backend = world.backend or ""
    if tensor.device.type == "cuda" and "nccl" in backend:
        return tensor.device
    if "gloo" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_(tensor: torch.Tensor, world: World | None = None, *, what: str = "a sum over the ranks") -> torch.Tensor:
    """Sum `tensor` over the ranks in place (any device: moved to the backend's device and back when needed)."""
    world = world or current()
    if not world.distributed:
        return tensor
    import torch.distributed as dist

    where = _backend_device(world, tensor)
    buffer = tensor if tensor.device == where else tensor.to(where)
    try:
        dist.all_reduce(buffer, group=world.group)
    except RuntimeError as e:
        raise PeerLost(f"rank {world.rank}: {what} failed, another rank stopped ({first_line(e)})") from None
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def all_reduce_floats(values: Sequence[float], world: World | None = None, *, what: str = "a sum over the ranks",
                      device: torch.device | None = None) -> list[float]:
    """Sums of a few numbers over the ranks (float64), e.g. the greedy search's squared errors."""
    world = world or current()
    if not world.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device or "cpu")
    return [float(v) for v in all_reduce_(t, world, what=what).tolist()]


def broadcast_object(obj: Any, world: World | None = None, *, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled through the gloo control group)."""
    world = world or current()
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world.rank == src else None]
    try:
        dist.broadcast_object_list(box, src=src, group=world.control)
    except RuntimeError as e:
        raise PeerLost(f"rank {world.rank}: waiting for rank {src} failed ({first_line(e)})") from None
    return box[0]


def gather_objects(obj: Any, world: World | None = None) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    world = world or current()
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    try:
        dist.all_gather_object(out, obj, group=world.control)
    except RuntimeError as e:
        raise PeerLost(f"rank {world.rank}: exchanging with the other ranks failed ({first_line(e)})") from None
    return out


# ------------------------------------------------------------------------------------------------ errors
class PeerInputError(TealQuantError):
    """Bad input found on another rank (exit 2); the message names the rank."""


class PeerInternalError(RuntimeError):
    """An internal error on another rank (exit 1); the message names the rank and the error's type."""


@contextlib.contextmanager
def agreement(what: str, world: World | None = None) -> Iterator[None]:
    """A block every rank runs; if it raises anywhere, it raises everywhere (the lowest failing rank's error).

    The failing rank re-raises its own exception; the others raise PeerInputError (bad input, exit 2) or
    PeerInternalError (exit 1) naming it. Every one of them is marked so that only rank 0 prints it
    (`reported_by_main`). Ctrl-C and SIGTERM pass through at once (no collective while the job is being stopped).
    """
    world = world or current()
    if not world.distributed:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - every error is announced to the other ranks, then re-raised
        error = e
    if error is not None and not isinstance(error, Exception):  # pragma: no cover - BaseException subclasses
        raise error
    mine = None if error is None else (isinstance(error, TealQuantError), _describe(error))
    outcomes = gather_objects(mine, world)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    rank, (bad_input, message) = failed[0]
    if error is not None and rank == world.rank:
        setattr(error, _AGREED, True)
        raise error
    prefix = f"rank {rank}: " if rank != 0 else ""
    peer = PeerInputError(prefix + message) if bad_input else PeerInternalError(prefix + message)
    setattr(peer, _AGREED, True)
    raise peer from None


def _describe(error: BaseException) -> str:
    if isinstance(error, TealQuantError):
        return str(error)
    return f"{type(error).__name__}: {first_line(error)}"


def mark_agreed(error: BaseException) -> BaseException:
    """Mark an error that every rank raises and rank 0 reports (other ranks stay quiet); returns it."""
    setattr(error, _AGREED, True)
    return error


def reported_by_main(error: BaseException, world: World | None = None) -> bool:
    """True on ranks other than 0 for an error every rank raised after an `agreement` (rank 0 prints it)."""
    world = world or current()
    return world.distributed and not world.is_main and bool(getattr(error, _AGREED, False))
