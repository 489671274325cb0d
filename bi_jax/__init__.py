"""bi_jax: batch-invariant GPU kernels for JAX (Pallas), each beside a plain-jnp reference path.

Every op takes ``implementation=``: None (Pallas on GPU, the reference elsewhere), "pallas" (on a
machine without a GPU: the same kernels in Pallas interpret mode), "reference" (plain jnp, invariant by
construction on every backend) or "xla" (XLA's default op, for comparison; promises nothing).
"""

from bi_jax import parallel, testing, timing
from bi_jax._backend import IMPLEMENTATIONS
from bi_jax.attention import AttentionConfig, attention, decode_attention
from bi_jax.matmul import MatmulConfig, dot_general, matmul
from bi_jax.norm import layer_norm, rms_norm
from bi_jax.reductions import RowConfig, log_softmax, mean, softmax, sum

__version__ = "0.1.0"

# Need the flax extra: imported on first access (bi_jax.nn), not here, and left out of __all__ so
# that ``from bi_jax import *`` works without flax.
_LAZY = ("nn", "llama")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"bi_jax.{name}")
    raise AttributeError(f"module 'bi_jax' has no attribute {name!r}")


__all__ = [
    "AttentionConfig",
    "IMPLEMENTATIONS",
    "MatmulConfig",
    "RowConfig",
    "attention",
    "decode_attention",
    "dot_general",
    "layer_norm",
    "log_softmax",
    "matmul",
    "mean",
    "parallel",
    "rms_norm",
    "softmax",
    "sum",
    "testing",
    "timing",
]
