"""bi_jax: batch-invariant GPU kernels for JAX (Pallas), each beside a plain-jnp reference path.

Every op takes ``implementation=``: None (Pallas on GPU, the reference elsewhere), "pallas" (on a
machine without a GPU: the same kernels in Pallas interpret mode), "reference" (plain jnp, invariant by
construction on every backend) or "xla" (XLA's default op, for comparison; promises nothing).
"""

from bi_jax import testing
from bi_jax._backend import IMPLEMENTATIONS
from bi_jax.matmul import MatmulConfig, dot_general, matmul

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "MatmulConfig",
    "dot_general",
    "matmul",
    "testing",
]
