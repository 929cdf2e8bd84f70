"""PLACEHOLDER: delegates to the pure-torch reference until the Triton kernels land (issue 3)."""

from .reference import dense_gemm_ref as dense_gemm  # noqa: F401
from .reference import sparse_gemv_fused_ref as sparse_gemv_fused  # noqa: F401
from .reference import sparse_gemv_ref as sparse_gemv  # noqa: F401
