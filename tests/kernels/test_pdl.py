"""Programmatic dependent launch (kernels/pdl_triton.py, kernels/dispatch.py): which families launch with it is data
(the GPU table's ``pdl``) or an explicit override; it never changes a result. The bit-equality check of a decode
step under PDL needs an sm_90+ GPU (the device run); the rest runs anywhere."""

import pytest
import torch
from teal_quant.kernels import dispatch

TABLES = sorted(p.stem for p in dispatch.CONFIG_DIR.glob("*.json"))


@pytest.fixture
def restore_override():
    yield
    dispatch.set_programmatic_launch(None)


@pytest.mark.parametrize("name", TABLES)
def test_table_pdl_entries_name_known_families_and_modes(name):
    pdl = dispatch._read_table(name).get("pdl", {})
    assert isinstance(pdl, dict)
    assert set(pdl) <= set(dispatch.PDL_FAMILIES) and set(pdl.values()) <= set(dispatch.PDL_MODES), pdl


def test_override_rejects_unknown_families_and_modes(restore_override):
    with pytest.raises(ValueError, match="unknown kernel families"):
        dispatch.set_programmatic_launch({"gemm": 1})
    with pytest.raises(ValueError, match="PDL modes"):
        dispatch.set_programmatic_launch({"gemv": 3})


def test_never_on_the_cpu(restore_override):
    dispatch.set_programmatic_launch({f: 2 for f in dispatch.PDL_FAMILIES})
    assert all(dispatch.programmatic_launch(torch.device("cpu"), f) == 0 for f in dispatch.PDL_FAMILIES)
    pytest.importorskip("triton")
    from teal_quant.kernels import pdl_triton

    assert pdl_triton.launch_options(torch.device("cpu"), "gemv") == {}


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="griddepcontrol needs an sm_90+ GPU")
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_under_pdl_is_bit_identical(restore_override, tiny_artifact, batch):
    """The fused decode step of the tiny artifact captured as a CUDA graph with every family in mode 1 and in mode 2:
    with deterministic reductions its tokens and logits over 12 greedy steps equal those without PDL bit for bit."""
    import teal_quant
    from teal_quant.runtime.decoding import Decoder

    model = teal_quant.load(tiny_artifact, sparsity=0.4, device="cuda")
    prompt = torch.randint(0, model.config.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(0)).cuda()
    outs = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for mode in (0, 1, 2):
            dispatch.set_programmatic_launch({f: mode for f in dispatch.PDL_FAMILIES})
            dec = Decoder(model, batch_size=batch, max_length=24, cuda_graph=True, fused_step=True)
            tokens = dec.generate(prompt, 12)
            assert dec._graph is not None, dec.graph_error
            outs.append((tokens, dec.logits.clone()))
    finally:
        torch.use_deterministic_algorithms(False)
    for tokens, logits in outs[1:]:
        assert torch.equal(tokens, outs[0][0]) and torch.equal(logits, outs[0][1])
