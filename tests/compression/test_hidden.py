"""HiddenStates: one buffer of calibration hidden states, updated in place (memory) or through two files read and
written a batch at a time (disk); both give back exactly what was written, in the buffer's dtype."""

import pytest
import torch

from teal_quant.compression.hidden import HiddenStates


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_and_memory_buffers_agree_layer_after_layer(tmp_path, dtype):
    shape = (5, 7, 12)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    memory = HiddenStates.in_memory(shape, dtype)
    disk = HiddenStates.on_disk(tmp_path / "h", shape, dtype)
    for h in (memory, disk):
        h.write_input(0, x[:3])
        h.write_input(3, x[3:])
    for layer in range(3):  # a "layer": y = 2x + layer, batch by batch (2 sequences at a time), in float32
        for h in (memory, disk):
            for start in range(0, shape[0], 2):
                stop = min(start + 2, shape[0])
                h.write(start, h.read(start, stop, "cpu", torch.float32) * 2 + layer)
            h.finish_layer()
        want = x.to(dtype)
        for j in range(layer + 1):
            want = (want.float() * 2 + j).to(dtype)
        assert torch.equal(memory.read(0, 5, "cpu", dtype), want)
        assert torch.equal(disk.read(0, 5, "cpu", dtype), want)
    assert disk.current == 1 and disk.current_file().stat().st_size == disk.nbytes == 5 * 7 * 12 * (4 if dtype == torch.float32 else 2)
    disk.close()


def test_a_disk_layer_cut_short_leaves_its_input_intact(tmp_path):
    """Layer i reads one file and writes the other: a crash mid-layer (no finish_layer) keeps the input."""
    shape = (4, 3, 2)
    x = torch.arange(24, dtype=torch.float32).view(shape)
    h = HiddenStates.on_disk(tmp_path, shape, torch.float32)
    h.write_input(0, x)
    h.write(0, torch.zeros(2, 3, 2))  # half of the layer's output, then "killed"
    again = HiddenStates.on_disk(tmp_path, shape, torch.float32, current=h.current)
    assert torch.equal(again.read(0, 4, "cpu", torch.float32), x)
    h.close()
    again.close()


def test_memory_checkpoint_round_trip(tmp_path):
    shape = (3, 4, 8)
    h = HiddenStates.in_memory(shape, torch.bfloat16)
    h.write_input(0, torch.randn(shape))
    h.save(tmp_path / "hidden.bin")
    assert (tmp_path / "hidden.bin").stat().st_size == h.nbytes
    back = HiddenStates.in_memory(shape, torch.bfloat16)
    back.load(tmp_path / "hidden.bin")
    assert torch.equal(back.tensor, h.tensor)
    with pytest.raises(ValueError, match="expected"):
        HiddenStates.in_memory((3, 4, 9), torch.bfloat16).load(tmp_path / "hidden.bin")
