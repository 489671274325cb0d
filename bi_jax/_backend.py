"""Everything backend-specific in one place: Pallas entry points, compiler params, interpret default.

When the Pallas API moves (it does, between jax releases), this is the file to change. Kernel modules
import ``pallas_call``, ``load``, ``store``, ``ds``, ``program_id`` and ``cdiv`` from here and never
touch ``jax.experimental.pallas.triton`` themselves.

* ``implementation=None`` resolves to ``"pallas"`` when jax's default backend is a GPU and to
  ``"reference"`` elsewhere.
* ``implementation="pallas"`` on a machine without a GPU runs the same kernels in Pallas interpret mode
  (set ``BI_JAX_INTERPRET=1`` to force interpret mode on a GPU machine, e.g. to debug a kernel).
* ``export_for_cuda`` lowers a function for CUDA on any machine (Pallas -> Triton IR), so CI checks the
  real GPU lowering of every kernel config without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

IMPLEMENTATIONS = ("pallas", "reference", "xla")

# Re-exported Pallas primitives used by the kernels.
ds = pl.ds
program_id = pl.program_id
cdiv = pl.cdiv
load = plt.load  # masked load: load(ref.at[...], mask=..., other=...)
store = plt.store  # masked store: store(ref.at[...], value, mask=...)


@functools.cache
def has_gpu() -> bool:
    """True when jax's default backend is a (CUDA) GPU."""
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:  # pragma: no cover - no backend at all
        return False


_FORCE_COMPILE = False  # set by export_for_cuda while it traces


def interpret_mode() -> bool:
    """Whether Pallas kernels run in interpret mode (no GPU, or BI_JAX_INTERPRET=1)."""
    if _FORCE_COMPILE:
        return False
    return os.environ.get("BI_JAX_INTERPRET", "") == "1" or not has_gpu()


def resolve_implementation(implementation: str | None, op: str) -> str:
    """Map the public ``implementation=`` argument to one of IMPLEMENTATIONS."""
    if implementation is None:
        return "pallas" if has_gpu() else "reference"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: unknown implementation {implementation!r}; valid names are None, "
            + ", ".join(repr(i) for i in IMPLEMENTATIONS)
        )
    return implementation


def pallas_call(
    kernel: Callable[..., None],
    *,
    out_shape: Any,
    grid: tuple[int, ...],
    num_warps: int,
    num_stages: int,
    name: str,
) -> Callable[..., Any]:
    """``pl.pallas_call`` with whole-array refs, Triton compiler params and the interpret default.

    Kernels index their refs themselves (``ref.at[ds(start, size), ...]``) and mask every load and
    store at the array edges: the Triton lowering does not mask partial blocks.
    """
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret_mode(),
        name=name,
    )


# An H100 as seen by the exporter: jax 0.11 lowers Pallas for CUDA on a CPU-only machine when the
# abstract mesh names a GPU device.
_EXPORT_DEVICE = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
)


def export_for_cuda(fn: Callable[..., Any], *args: Any) -> jax.export.Exported:
    """Lower ``fn`` for CUDA with the real Pallas->Triton lowering, on any machine.

    ``args`` are arrays or ``jax.ShapeDtypeStruct``s. Interpret mode is off while ``fn`` is traced, so
    ``fn`` must call the kernels with ``implementation="pallas"`` and must not hide them behind an
    inner ``jax.jit`` that was already traced in interpret mode.
    """
    with _forced_gpu_lowering():
        mesh = jax.sharding.AbstractMesh((), (), abstract_device=_EXPORT_DEVICE)
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.export.export(
                jax.jit(fn),
                platforms=["cuda"],
                disabled_checks=[
                    jax.export.DisabledSafetyCheck.custom_call(plt.CUSTOM_CALL_TARGET_NAME)
                ],
            )(*args)


def triton_kernel_count(exported: jax.export.Exported) -> int:
    """Number of Pallas-Triton custom calls in an exported module (to check lowering happened)."""
    return exported.mlir_module().count(plt.CUSTOM_CALL_TARGET_NAME)


@contextlib.contextmanager
def _forced_gpu_lowering() -> Iterator[None]:
    """Interpret mode off while tracing for an export (restored afterwards)."""
    global _FORCE_COMPILE
    saved, _FORCE_COMPILE = _FORCE_COMPILE, True
    try:
        yield
    finally:
        _FORCE_COMPILE = saved
