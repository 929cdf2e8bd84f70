"""teal_quant.load(): an artifact (a directory, or a Hub repo id) -> a transformers model whose linear layers are
TealLinear, assembled from the safetensors shards by runtime/assemble.py (meta skeleton, packed buffers,
load_state_dict(assign=True): no dense weight of a quantized layer ever exists in memory), with the artifact's
generation config and, on CUDA, the decode fusions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from teal_quant.artifact.format import Artifact, read_artifact
from teal_quant.artifact.hub import looks_like_local_path
from teal_quant.devices import resolve_dtype, select_device
from teal_quant.errors import ArtifactError, HubError, first_line
from teal_quant.runtime.assemble import assemble
from teal_quant.runtime.modules import realized_sparsity, set_sparsity

__all__ = ["load", "set_sparsity", "realized_sparsity", "resolve_artifact"]


def resolve_artifact(path_or_repo_id: str | Path, revision: str | None = None) -> Artifact:
    """A local artifact directory, or a Hub repo id fetched through huggingface_hub's cache (teal_quant.artifact.hub)."""
    source = str(path_or_repo_id)
    path = Path(source).expanduser()
    if not path.is_dir():
        if path.exists():
            raise ArtifactError(f"artifact '{source}': is a file, expected an artifact directory")
        if looks_like_local_path(source) or isinstance(path_or_repo_id, Path):
            raise ArtifactError(f"artifact '{source}': no such directory")
        from teal_quant.artifact.hub import download

        try:
            path = download(source, revision)
        except HubError as e:
            raise ArtifactError(f"artifact '{source}': not a local directory; {e}") from None
    return read_artifact(path)


def load(
    path_or_repo_id: str | Path,
    *,
    sparsity: float | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    tp: bool | object = False,
):
    """Load an artifact as a transformers model, at `sparsity` (default: the artifact's default level).

    dtype defaults to the artifact's dtype on CUDA and float32 on the CPU (CPU half-precision matmuls are slow).
    A `sparsity` that is not one of the artifact's levels, a corrupt generation_config.json or any other artifact
    problem raises ArtifactError (one line) before the weights are read.

    tp: tensor-parallel decoding (docs/decoding.md). True: over every rank of the job torchrun started (the process
    group is joined here when needed: NCCL on CUDA, each rank on cuda:LOCAL_RANK; gloo on the CPU); a process group:
    over its ranks. Every rank calls `load` and gets its shard (runtime/tensor_parallel.py). False: one process.
    """
    from transformers import AutoConfig, GenerationConfig

    artifact = resolve_artifact(path_or_repo_id, revision)
    if sparsity is not None:
        try:
            artifact.quant.level_index(sparsity)
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"artifact '{artifact.path}': {first_line(e)}") from None
    device = select_device(device)
    group = None
    if tp is True:
        from teal_quant import distributed

        device = distributed.init(device).local_device(device)
    elif tp is not False and tp is not None:
        group = tp
    try:
        config = AutoConfig.from_pretrained(artifact.path)
    except Exception as e:
        raise ArtifactError(f"artifact '{artifact.path}': config.json is not a model config ({first_line(e)})") from None
    if dtype is None:
        dtype = resolve_dtype("auto", getattr(config, "dtype", None)) if device.type == "cuda" else torch.float32
    model = assemble(config, artifact.quant, artifact.tensors("cpu"), device=device, dtype=dtype,
                     quantized=artifact.quantized_modules(), level=sparsity, where=f"artifact '{artifact.path}'")
    if (artifact.path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(artifact.path)
        except Exception as e:  # noqa: BLE001 - invalid JSON or values: the artifact's problem, said in one line
            raise ArtifactError(f"artifact '{artifact.path}': generation_config.json cannot be read "
                                f"({first_line(e)})") from None
    if tp is not False and tp is not None:
        from teal_quant.runtime.tensor_parallel import shard_for_tensor_parallel

        shard_for_tensor_parallel(model, group)
    if device.type == "cuda":  # q/k/v, gate/up, norms, SiLU-and-mul, rotary: one launch each (teal_quant/runtime/fusion.py)
        from teal_quant.runtime.fusion import fuse_for_decode

        fuse_for_decode(model)
    return model
