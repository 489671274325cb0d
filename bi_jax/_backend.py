"""Everything backend-specific in one place: Pallas entry points, compiler params, interpret default.

When the Pallas API moves (it does, between jax releases), this is the file to change. Kernel modules
import ``pallas_call``, ``load``, ``store``, ``ds``, ``program_id`` and ``cdiv`` from here and never
touch ``jax.experimental.pallas.triton`` themselves.

* ``implementation=None`` resolves to ``"pallas"`` when jax's default backend is a GPU and to
  ``"reference"`` elsewhere.
* ``implementation="pallas"`` on a machine without a GPU runs the same kernels in Pallas interpret mode
  (set ``BI_JAX_INTERPRET=1`` to force interpret mode on a GPU machine, e.g. to debug a kernel).
* ``export_for_cuda`` lowers a function for CUDA on any machine (Pallas -> Triton IR, Pallas -> Mosaic
  GPU), so CI checks the real GPU lowering of every kernel config without a GPU.
* Mosaic GPU (Hopper: TMA, wgmma, warp specialisation) kernels are written against ``mgpu`` (the
  ``jax.experimental.pallas.mosaic_gpu`` module) and launched with ``mosaic_kernel``; without a GPU they
  run in jax's GPU interpret mode.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as mgpu
from jax.experimental.pallas import triton as plt

IMPLEMENTATIONS = ("pallas", "reference", "xla")

# Re-exported Pallas primitives used by the kernels.
ds = pl.ds
program_id = pl.program_id
cdiv = pl.cdiv
load = plt.load  # masked load: load(ref.at[...], mask=..., other=...)
store = plt.store  # masked store: store(ref.at[...], value, mask=...)
when, loop, run_scoped, run_state = pl.when, pl.loop, pl.run_scoped, pl.run_state  # Mosaic GPU


def inline_asm(asm: str, *args: jax.Array) -> jax.Array:
    """One elementwise PTX instruction (fp32 in, fp32 out) in a Triton kernel: ``$0`` is the result."""
    return plt.elementwise_inline_asm(
        asm, args=list(args), constraints="=r" + ",r" * len(args), pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)],
    )[0]


_NOT_HOPPER = False  # set by assume_not_hopper


def is_hopper() -> bool:
    """True when jax's default device is a compute-capability 9.0 GPU (H100, H200, H800, GH200)."""
    return not _NOT_HOPPER and _device_is_hopper()


@functools.cache
def _device_is_hopper() -> bool:
    if not has_gpu():
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")) == "9.0"


@contextlib.contextmanager
def assume_not_hopper() -> Iterator[None]:
    """``is_hopper()`` is False inside (to list or test the configs of other GPUs)."""
    global _NOT_HOPPER
    saved, _NOT_HOPPER = _NOT_HOPPER, True
    try:
        yield
    finally:
        _NOT_HOPPER = saved


@functools.cache
def sm_count() -> int:
    """Streaming multiprocessors of jax's default GPU (an H100's 132 without a GPU: export,
    interpret mode). Persistent kernels launch at most this many CTAs; never part of the numerics."""
    if not has_gpu():
        return _EXPORT_DEVICE.num_cores
    return int(getattr(jax.devices()[0], "core_count", 0) or _EXPORT_DEVICE.num_cores)


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


def interpret_pin(x):
    """``x`` materialised in interpret mode (an optimization barrier); ``x`` itself on the GPU.

    In interpret mode a kernel body is compiled by XLA:CPU, which fuses an expression with its
    neighbours differently in different programs (an elementwise product into the reduction that
    reads it, a multiply and an add into an FMA, a bf16 round trip dropped): launch choices that
    change only which values a program reuses (``write_tiles``, ``_write_parts``) then move a bit
    or two. A barrier makes ``x`` exist as computed. On the GPU ``x`` is returned unchanged, so the
    compiled kernels are exactly as written."""
    return lax.optimization_barrier(x) if interpret_mode() else x


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


_DETECT_RACES = False  # set by race_detection


@contextlib.contextmanager
def race_detection() -> Iterator[Callable[[], bool]]:
    """Mosaic GPU kernels interpreted inside run jax's happens-before race detector; yields a
    function that says whether it has reported a race (tests of the barrier protocols)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

    global _DETECT_RACES
    saved, _DETECT_RACES = _DETECT_RACES, True
    ipc.reset_gpu_interpret_mode_state()
    try:
        yield lambda: bool(ipc.get_races().races_found)
    finally:
        _DETECT_RACES = saved


def trace_key() -> tuple[bool, bool, bool, int]:
    """What tracing a kernel launcher reads besides its arguments: interpret mode, race detection,
    ``is_hopper()`` and the SM count. The jitted launchers take it as a static argument, so one
    traced under other settings (a test's monkeypatch, an export) is never reused."""
    return (interpret_mode(), _DETECT_RACES, is_hopper(), sm_count())


def mosaic_kernel(body: Callable[..., None], *, out_type: Any, grid: tuple[int, ...],
                  grid_names: tuple[str, ...], num_threads: int,
                  thread_name: str) -> Callable[..., Any]:
    """``mgpu.kernel`` with the project's compiler params and the interpret default.

    ``approx_math``: ``exp2`` is the hardware ``ex2.approx.ftz.f32`` (the Triton kernels use the
    same instruction through ``inline_asm`` where their bits must match); division is unchanged.

    In interpret mode each of the ``num_threads`` warpgroups is a host thread whose callbacks
    block on the simulated barriers, on the XLA CPU client's thread pool (as many threads as
    cores unless ``PJRT_NPROC`` says otherwise, read when jax starts). With fewer pool threads
    than ``num_threads + 1`` a kernel can wait forever; the tests set ``PJRT_NPROC``.
    """
    interpret = None
    if interpret_mode():
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams(detect_races=_DETECT_RACES)
    return mgpu.kernel(
        body,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=num_threads,
        thread_name=thread_name,
        compiler_params=mgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )


def wgmma(acc_ref, a_ref, b_ref, *, transpose_b: bool = False) -> Callable[[], jax.Array]:
    """Issue ``acc += a @ b`` in a Mosaic GPU kernel; returns a function that reads the result.

    SMEM refs ``a [M, K]`` and ``b [K, N]`` (``[N, K]`` with ``transpose_b``) of a 16-bit dtype;
    ``acc_ref [M, N]`` an fp32 ``plgpu.ACC``. On the GPU this is ``plgpu.wgmma`` (asynchronous:
    the returned function reads ``acc_ref``, which waits for it). In interpret mode the product
    is ``ordered_dot`` (jax's GPU interpreter runs a wgmma as a host BLAS call; see there) and the
    accumulator ref is only read (the interpreter cannot store a value into one).
    """
    if not interpret_mode():
        mgpu.wgmma(acc_ref, a_ref, b_ref.transpose((1, 0)) if transpose_b else b_ref)
        return lambda: acc_ref[...]
    b = wgmma_operand(b_ref)
    out = ordered_dot(wgmma_operand(a_ref), b.T if transpose_b else b, acc_ref[...])
    return lambda: out


def wgmma_operand(ref) -> jax.Array:
    """Interpret mode: the SMEM operand ``ref`` of a product, read as the tensor cores read it.

    A wgmma reads SMEM through the async proxy, which a TMA write into the same slot after the
    slot's release barrier is ordered with. A plain load is a generic-proxy read; jax's race
    detector (rightly) orders it with a later TMA write only after a proxy fence, so the read is
    followed by ``commit_smem`` (that fence)."""
    value = ref[...]
    mgpu.commit_smem()
    return value


def ordered_dot(a: jax.Array, b: jax.Array, acc: jax.Array) -> jax.Array:
    """Interpret mode's ``acc + a @ b``: ``a [M, K]``, ``b [K, N]`` 16-bit, ``acc [M, N]`` fp32.

    jax's GPU interpreter runs a wgmma as a host BLAS call, whose sums depend on where a row sits
    in the tile on some CPUs (seen on an AVX2 AMD EPYC with OpenBLAS 0.3.34: the rows of
    ``a[perm] @ b`` are not the permuted rows of ``a @ b``). A kernel that puts a row in another
    slot of its tile (attention's packed rows, decode step against full prefill) would look
    batch-variant in interpret mode on some machines. Here each product is exact in fp32 (16-bit
    inputs) and they are added to ``acc`` for ``k = 0, 1, ...`` in order, elementwise only: the
    same for every row on every host. Interpret mode checks a kernel's logic, not the tensor
    cores' bits.
    """
    if a.dtype.itemsize != 2 or b.dtype.itemsize != 2:
        raise NotImplementedError(f"ordered_dot: 16-bit operands only, got {a.dtype} and {b.dtype}")
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)

    def add_k(k, total):  # [M, 1] * [1, N]: exact products
        return total + lax.dynamic_slice_in_dim(a, k, 1, 1) * lax.dynamic_slice_in_dim(b, k, 1, 0)

    return lax.fori_loop(0, a.shape[1], add_k, acc)


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


def mosaic_kernel_count(exported: jax.export.Exported) -> int:
    """Number of Mosaic GPU custom calls in an exported module."""
    return exported.mlir_module().count("stablehlo.custom_call @mosaic_gpu")


@contextlib.contextmanager
def _forced_gpu_lowering() -> Iterator[None]:
    """Interpret mode off while tracing for an export (restored afterwards)."""
    global _FORCE_COMPILE
    saved, _FORCE_COMPILE = _FORCE_COMPILE, True
    try:
        yield
    finally:
        _FORCE_COMPILE = saved
