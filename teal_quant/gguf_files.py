"""GGUF files parsed once per process.

transformers parses a GGUF file's whole metadata each time it reads the config, the tokenizer or the weights (for
SmolLM2-135M a 49,152-token vocabulary: ~5 s on 2 cores per parse), and the model card reads the license from it
too: four parses per compression run. Inside `shared_gguf_parse()` every `gguf.GGUFReader(path)` of the same
unchanged file (path, size and modification time) returns one parsed reader; the reader of the most recent file is
kept for the next block (a run and the evaluation after it, or a test suite's many builds, parse it once).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

_LOCK = threading.Lock()
_LAST: dict[tuple, object] = {}  # (real path, size, mtime_ns) -> the parsed reader; one entry at most


def read(path: str | os.PathLike) -> object:
    """A parsed `gguf.GGUFReader` of `path` (read-only), shared with every other caller of the same unchanged file."""
    import gguf

    original = getattr(gguf.GGUFReader, "__wrapped__", gguf.GGUFReader)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _LOCK:
        reader = _LAST.get(key)
        if reader is None:
            reader = original(path)
            _LAST.clear()
            _LAST[key] = reader
    return reader


@contextmanager
def shared_gguf_parse() -> Iterator[None]:
    """transformers' GGUF readers (config, tokenizer, weights) share one parse per file inside the block."""
    import gguf

    original = gguf.GGUFReader
    if hasattr(original, "__wrapped__"):  # nested: the outer block already shares
        yield
        return

    def reader(path, mode: str = "r"):
        return read(path) if mode == "r" else original(path, mode)

    reader.__wrapped__ = original
    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
