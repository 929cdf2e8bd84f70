"""The calibration hidden states [samples, seq_len, hidden]: one buffer, updated in place layer after layer.

A 70B-width model calibrated on 128 x 2048 tokens has 8.6 GB of hidden states in float32 (4.3 GB in bfloat16), so
the pipeline keeps exactly one copy: each batch of sequences is read, run through the layer, and its output written
over its input (a sequence's output depends only on that sequence). Where the copy lives:

- "memory": a tensor in host memory (or on the compute device, for small synthetic models);
- "disk": two files, read and written batch by batch with pread/pwrite, so host memory holds one batch at a time;
  layer i reads file A and writes file B, layer i+1 reads B and writes A. A crash mid-layer leaves the input intact,
  so the files double as the checkpoint --resume starts from.

The dtype is the recipe's runtime.hidden_dtype (bfloat16 halves the buffer; the layers still compute in the
compute dtype: each batch is converted on its way in and out).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class HiddenStates:
    """[samples, seq_len, hidden] in `dtype`, in memory (`tensor`) or in two files on disk (`files`)."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, *, tensor: torch.Tensor | None = None,
                 files: tuple[Path, Path] | None = None, current: int = 0):
        self.shape, self.dtype = tuple(int(s) for s in shape), dtype
        self.tensor, self.files, self.current = tensor, files, current
        self._fds: list[int] = []
        if files is not None:
            for f in files:
                fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
                os.ftruncate(fd, self.nbytes)
                self._fds.append(fd)

    # ---------------------------------------------------------------- construction
    @classmethod
    def in_memory(cls, shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> "HiddenStates":
        return cls(shape, dtype, tensor=torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    def on_disk(cls, folder: Path, shape, dtype: torch.dtype, current: int = 0) -> "HiddenStates":
        folder.mkdir(parents=True, exist_ok=True)
        return cls(shape, dtype, files=(folder / "hidden-a.bin", folder / "hidden-b.bin"), current=current)

    # ---------------------------------------------------------------- geometry
    @property
    def samples(self) -> int:
        return self.shape[0]

    @property
    def seq_len(self) -> int:
        return self.shape[1]

    @property
    def sample_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.sample_bytes

    @property
    def on_disk_mode(self) -> bool:
        return self.files is not None

    # ---------------------------------------------------------------- access
    def read(self, start: int, stop: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Sequences start..stop-1 on `device` in `dtype` (a copy, or a view when nothing needs converting)."""
        if self.tensor is not None:
            return self.tensor[start:stop].to(device=device, dtype=dtype)
        out = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        _pread_into(self._fds[self.current], out, start * self.sample_bytes)
        return out.to(device=device, dtype=dtype)

    def write(self, start: int, values: torch.Tensor) -> None:
        """Store `values` as sequences start.. of the layer's output (in place in memory; the other file on disk)."""
        if self.tensor is not None:
            self.tensor[start:start + values.shape[0]].copy_(values)
            return
        host = values.to(device="cpu", dtype=self.dtype).contiguous()
        _pwrite_from(self._fds[1 - self.current], host, start * self.sample_bytes)

    def write_input(self, start: int, values: torch.Tensor) -> None:
        """Store `values` as sequences start.. of the current input (the embeddings, before the first layer)."""
        if self.tensor is not None:
            self.tensor[start:start + values.shape[0]].copy_(values)
            return
        _pwrite_from(self._fds[self.current], values.to(device="cpu", dtype=self.dtype).contiguous(),
                     start * self.sample_bytes)

    def finish_layer(self) -> None:
        """Every batch of the layer's output is written: it becomes the next layer's input."""
        if self.files is not None:
            os.fsync(self._fds[1 - self.current])
            self.current = 1 - self.current

    def current_file(self) -> Path | None:
        return None if self.files is None else self.files[self.current]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    # ---------------------------------------------------------------- checkpoint (memory mode)
    def save(self, path: Path) -> None:
        """The buffer's raw bytes to `path` (memory mode's checkpoint for --resume), written without a second copy
        in memory and flushed to disk."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            host = self.tensor if self.tensor.device.type == "cpu" else self.tensor.to("cpu")
            _pwrite_from(fd, host.contiguous(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self, path: Path) -> None:
        """Inverse of `save` (the shape and dtype are the caller's, from the run's resume state)."""
        if path.stat().st_size != self.nbytes:
            raise ValueError(f"'{path}' holds {path.stat().st_size} bytes, expected {self.nbytes}")
        fd = os.open(path, os.O_RDONLY)
        try:
            direct = self.tensor.device.type == "cpu" and self.tensor.is_contiguous()
            host = self.tensor if direct else torch.empty(self.shape, dtype=self.dtype)
            _pread_into(fd, host, 0)
        finally:
            os.close(fd)
        if not direct:
            self.tensor.copy_(host)


def _bytes_view(t: torch.Tensor):
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    view, done = _bytes_view(out.view(-1)), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read of the hidden-state file at byte {offset + done}")
        done += n


def _pwrite_from(fd: int, values: torch.Tensor, offset: int) -> None:
    view, done = _bytes_view(values.view(-1)), 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
