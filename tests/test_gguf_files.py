"""teal_quant.gguf_files: one parse per unchanged GGUF file inside `shared_gguf_parse`, a fresh one when the file
changes, and gguf's own reader outside the block."""

from __future__ import annotations

import os

import gguf
import numpy as np

from teal_quant import gguf_files


def write_gguf(path, license_: str) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.license", license_)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_one_parse_per_unchanged_file_and_a_new_one_after_a_change(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "apache-2.0")
    original = gguf.GGUFReader
    with gguf_files.shared_gguf_parse():
        assert gguf.GGUFReader is not original
        first = gguf.GGUFReader(path)
        with gguf_files.shared_gguf_parse():  # nested: the same shared reader
            assert gguf.GGUFReader(str(path)) is first
        assert first.fields["general.license"].contents() == "apache-2.0"
        assert np.array_equal(np.asarray(first.tensors[0].data).reshape(4, 8),
                              np.arange(32, dtype=np.float32).reshape(4, 8))
    assert gguf.GGUFReader is original  # restored
    assert gguf_files.read(path) is first  # kept for the next block
    write_gguf(path, "mit")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new file: other size or modification time
    second = gguf_files.read(path)
    assert second is not first and second.fields["general.license"].contents() == "mit"
    assert gguf.GGUFReader(path) is not second  # outside the block: gguf's own reader, a fresh parse
