"""Timing of jitted functions: device time, compilation and warm-up excluded, operands from HBM.

::

    from bi_jax import timing

    x = timing.random_array(0, (4096, 8192), jnp.bfloat16)          # random, never zero
    t = timing.time_fn(lambda x: bi_jax.rms_norm(x), x, reps=50)     # a Timing
    print(t.median_ms, t.p10_ms, t.p90_ms, t.gbps)
    bw = timing.copy_bandwidth()                                     # measured HBM copy bandwidth
    json.dump({"env": timing.environment(), "rms_norm": t.to_dict()}, f)

What ``time_fn`` measures:

* **Compilation first, then warm-up, then repetitions.** ``fn`` is compiled ahead of time
  (``jax.jit(fn).lower(*args).compile()``, its duration is ``compile_s``), called ``warmup`` times
  untimed, then ``reps`` times timed.
* **Device time on a GPU.** ``method="cupti"`` (the default when jax's backend is a GPU) sums the
  durations of every GPU kernel one call launches, recorded by CUPTI through jax's
  ``jax.experimental.mosaic.gpu.profiler.measure``: Python dispatch and launch gaps are not counted.
  ``method="wall"`` (the default elsewhere) is the wall clock of ``fn(*args)`` plus
  ``jax.block_until_ready``, which includes dispatch.
* **Rotation of operands.** An H100 has a 50 MB L2 cache: timing one call after another on the same
  operands reads them from L2, not HBM, and makes memory-bound kernels look faster than in a model.
  ``rotate`` makes copies of all arguments and cycles through them, so that between two uses of a
  copy at least twice the L2 size of other data has been read (``rotation_copies``).
* **Spread.** Every repetition is kept (``times_ms``); ``median_ms``, ``p10_ms``, ``p90_ms``,
  ``min_ms``, ``max_ms``, ``mean_ms`` and ``std_ms`` summarise them.

Inputs for timing should be random and never zero (some hardware is faster on zeros):
``random_array`` makes them, and its rows are prefix-stable, so the first rows of a ``[8, H]`` array
equal a ``[1, H]`` array from the same key (the benchmarks check batch invariance with this).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import pathlib
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "L2_BYTES",
    "METHODS",
    "Timing",
    "copy_bandwidth",
    "cupti_available",
    "environment",
    "random_array",
    "rotation_copies",
    "summarize",
    "time_fn",
    "tree_bytes",
]

L2_BYTES = 50 * 2**20  # L2 cache of an H100 (and an H200)
METHODS = ("cupti", "wall")
MAX_COPIES = 64  # upper bound of rotate="auto"
DEFAULT_MAX_ROTATE_BYTES = 8 * 2**30  # rotate="auto" never holds more than this in copies
DEFAULT_MAX_OUTPUT_BYTES = 4 * 2**30  # CUPTI batches: outputs of one batch of calls held at once


# -------------------------------------------------------------------------------------- statistics


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, 10th/90th percentiles (linear interpolation), min, max, mean, std of ``times_ms``."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"summarize: need a non-empty 1-D sequence of times, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"summarize: times must be finite, got {t.tolist()}")
    p10, p50, p90 = np.percentile(t, [10, 50, 90])
    return {
        "n": int(t.size),
        "median_ms": float(p50),
        "p10_ms": float(p10),
        "p90_ms": float(p90),
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "mean_ms": float(t.mean()),
        "std_ms": float(t.std()),
    }


@dataclasses.dataclass(frozen=True)
class Timing:
    """The repetitions of one timed function and what they mean.

    Fields are plain data (``to_dict``/``from_dict`` round-trip through JSON). ``bytes_accessed``
    and ``flops``, when given, turn the median into ``gbps`` (GB/s, 1e9 bytes) and ``tflops``.
    ``kernels`` lists, for CUPTI timings, the most expensive GPU kernels of one call as
    ``(name, median ms per call)``.
    """

    name: str
    method: str
    times_ms: tuple[float, ...]
    copies: int = 1
    warmup: int = 1
    compile_s: float | None = None
    bytes_accessed: int | None = None
    flops: int | None = None
    kernels: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Timing: method {self.method!r} is not one of {METHODS}")
        object.__setattr__(self, "times_ms", tuple(float(t) for t in self.times_ms))
        object.__setattr__(
            self, "kernels", tuple((str(n), float(ms)) for n, ms in self.kernels)
        )
        summarize(self.times_ms)  # validates: non-empty and finite

    # Statistics (derived, not stored).
    @property
    def stats(self) -> dict[str, float]:
        return summarize(self.times_ms)

    @property
    def reps(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return self.stats["median_ms"]

    @property
    def p10_ms(self) -> float:
        return self.stats["p10_ms"]

    @property
    def p90_ms(self) -> float:
        return self.stats["p90_ms"]

    @property
    def min_ms(self) -> float:
        return self.stats["min_ms"]

    @property
    def max_ms(self) -> float:
        return self.stats["max_ms"]

    @property
    def mean_ms(self) -> float:
        return self.stats["mean_ms"]

    @property
    def std_ms(self) -> float:
        return self.stats["std_ms"]

    @property
    def gbps(self) -> float | None:
        """Achieved bandwidth at the median, ``bytes_accessed / median`` in GB/s (1e9 bytes/s)."""
        if self.bytes_accessed is None or self.median_ms <= 0:
            return None
        return self.bytes_accessed / (self.median_ms * 1e-3) / 1e9

    @property
    def tflops(self) -> float | None:
        """Achieved throughput at the median in TFLOP/s (1e12 flop/s)."""
        if self.flops is None or self.median_ms <= 0:
            return None
        return self.flops / (self.median_ms * 1e-3) / 1e12

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: every field, plus the statistics, ``gbps`` and ``tflops``."""
        d = dataclasses.asdict(self)
        d["times_ms"] = list(self.times_ms)
        d["kernels"] = [[n, ms] for n, ms in self.kernels]
        d.update(self.stats)
        d["gbps"] = self.gbps
        d["tflops"] = self.tflops
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Timing:
        """Inverse of ``to_dict`` (derived keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["kernels"] = tuple(tuple(k) for k in kwargs.get("kernels", ()))
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------- helpers


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of a pytree (leaves without shape/dtype count 0)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def rotation_copies(
    nbytes: int,
    rotate: int | str | None = "auto",
    *,
    l2_bytes: int = L2_BYTES,
    max_bytes: int = DEFAULT_MAX_ROTATE_BYTES,
) -> int:
    """How many copies of the arguments (``nbytes`` in total) the timing loop cycles through.

    ``rotate``: ``None``/``False``/``0``/``1`` -> 1 (no rotation); an int ``n`` -> ``n``;
    ``"auto"`` -> enough copies that at least ``2 * l2_bytes`` of other copies are read between two
    uses of one copy (``1 + ceil(2 * l2 / nbytes)``), at least 2, at most ``MAX_COPIES``, and at
    most ``max_bytes // nbytes`` (1 if even two copies do not fit: an operand that large flushes the
    cache by itself).
    """
    if rotate is None or rotate is False:
        return 1
    if isinstance(rotate, str):
        if rotate != "auto":
            raise ValueError(
                f"rotation_copies: rotate must be 'auto', None or an int, got {rotate!r}"
            )
        if nbytes <= 0:
            return 1
        n = max(2, 1 + math.ceil(2 * l2_bytes / nbytes))
        n = min(n, MAX_COPIES, max(1, max_bytes // nbytes))
        return max(1, n)
    if isinstance(rotate, (int, np.integer)) and not isinstance(rotate, bool):
        if rotate < 0:
            raise ValueError(f"rotation_copies: rotate must be >= 0, got {rotate}")
        return max(1, int(rotate))
    raise TypeError(f"rotation_copies: rotate must be 'auto', None or an int, got {rotate!r}")


def _copy_tree(tree: Any) -> Any:
    """A copy of every array leaf in its own device buffer."""

    def copy(x):
        if isinstance(x, (jax.Array, np.ndarray)):
            return jnp.array(x, copy=True)
        return x

    return jax.tree.map(copy, tree)


@functools.cache
def cupti_available() -> bool:
    """True when jax's backend is a GPU and jax's CUPTI profiler extension is loaded."""
    try:
        if jax.default_backend() != "gpu":
            return False
        from jax.experimental.mosaic.gpu import profiler
    except Exception:  # any import or backend failure means no CUPTI
        return False
    return getattr(profiler, "mosaic_gpu_lib", None) is not None


def _resolve_method(method: str) -> str:
    if method == "auto":
        return "cupti" if cupti_available() else "wall"
    if method not in METHODS:
        raise ValueError(f"time_fn: method must be 'auto', 'cupti' or 'wall', got {method!r}")
    if method == "cupti" and not cupti_available():
        raise RuntimeError(
            "time_fn: method='cupti' needs a GPU backend and jax's Mosaic GPU extension "
            f"(jax.default_backend() is {jax.default_backend()!r}); use method='wall'"
        )
    return method


# ---------------------------------------------------------------------------------------- time_fn


class _Rotation:
    """A zero-argument callable that runs the compiled function on the next copy of the arguments.

    ``profiler.measure`` calls ``f(*args)`` with the same arguments every iteration and re-jits
    ``f`` unless it is a ``jax.stages.Wrapped``; this class has that protocol's methods
    (``__call__``, ``trace``, ``lower``) so that ``measure`` calls it as is and each iteration reads
    another copy.
    """

    def __init__(self, compiled: Callable[..., Any], copies: Sequence[tuple[Any, ...]], start: int):
        self._compiled = compiled
        self._copies = copies
        self.index = start  # copy used by the next call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            raise TypeError("_Rotation takes no arguments")
        copy = self._copies[self.index % len(self._copies)]
        self.index += 1
        return self._compiled(*copy)

    def trace(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - protocol only
        raise NotImplementedError

    def lower(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - protocol only
        raise NotImplementedError


def _measure_cupti(
    compiled: Callable[..., Any],
    copies: Sequence[tuple[Any, ...]],
    start: int,
    reps: int,
    out_bytes: int,
    max_output_bytes: int,
) -> tuple[list[float], tuple[tuple[str, float], ...]]:
    """Per-call kernel time (ms) of ``reps`` calls rotating through ``copies``; the top kernels."""
    from jax.experimental.mosaic.gpu import profiler

    rotation = _Rotation(compiled, copies, start)
    if not isinstance(rotation, jax.stages.Wrapped):  # pragma: no cover - jax version dependent
        raise RuntimeError(
            "time_fn: this jax version no longer treats the rotation wrapper as "
            "jax.stages.Wrapped; profiler.measure would re-jit it and time one copy only. "
            "Update bi_jax.timing."
        )
    # measure() keeps every output of a batch alive until the batch ends: bound their total size.
    batch = max(1, min(reps, max_output_bytes // max(out_bytes, 1)))
    per_call: list[list[tuple[str, float]]] = []
    while len(per_call) < reps:
        k = min(batch, reps - len(per_call))
        _, timings = profiler.measure(rotation, aggregate=False, iterations=k)()
        if timings is None:
            raise RuntimeError("time_fn: CUPTI recorded no GPU kernel launched by the function")
        per_call.extend([timings] if k == 1 else timings)
    times = [sum(ms for _, ms in call) for call in per_call]
    by_name: dict[str, list[float]] = {}
    for i, call in enumerate(per_call):
        for name, ms in call:
            by_name.setdefault(name, [0.0] * len(per_call))[i] += ms
    kernels = sorted(((n, float(np.median(v))) for n, v in by_name.items()), key=lambda t: -t[1])
    return times, tuple(kernels[:8])


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    reps: int = 30,
    warmup: int = 1,
    rotate: int | str | None = "auto",
    method: str = "auto",
    jit: bool = True,
    name: str | None = None,
    bytes_accessed: int | None = None,
    flops: int | None = None,
    max_seconds: float | None = None,
    min_reps: int = 3,
    inspect_output: Callable[[Any], None] | None = None,
    l2_bytes: int = L2_BYTES,
    max_rotate_bytes: int = DEFAULT_MAX_ROTATE_BYTES,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> Timing:
    """Time ``fn(*args)``: compile, warm up, then ``reps`` timed calls; returns a ``Timing``.

    Args:
      fn: the function; with ``jit=True`` it is compiled ahead of time for ``args`` (the compile
        time is reported as ``compile_s`` and never timed). With ``jit=False`` it is called as is
        (an already compiled function, or a plain Python function in tests).
      *args: its arguments (arrays or pytrees of arrays). Use random, non-zero values
        (``random_array``).
      reps: timed calls (at least ``min_reps`` survive ``max_seconds``).
      warmup: untimed calls after compilation (>= 1).
      rotate: copies of ``args`` to cycle through (``rotation_copies``): ``"auto"`` (default), an
        int, or None.
      method: ``"auto"`` (CUPTI kernel time on a GPU, wall clock elsewhere), ``"cupti"`` or
        ``"wall"``.
      name, bytes_accessed, flops: recorded in the result (``gbps``/``tflops`` use them).
      max_seconds: when the last warm-up call (wall clock) times ``reps`` exceeds this, fewer
        repetitions are run (not fewer than ``min_reps``).
      inspect_output: called once with the output of the first warm-up call (e.g. to keep a slice of
        it for a bitwise comparison) before timing starts.
      l2_bytes, max_rotate_bytes: see ``rotation_copies``.
      max_output_bytes: CUPTI runs calls in batches whose outputs stay alive together; a batch
        holds at most this many output bytes.
    """
    if reps < 1 or min_reps < 1:
        raise ValueError(f"time_fn: reps ({reps}) and min_reps ({min_reps}) must be >= 1")
    if warmup < 1:
        raise ValueError(
            f"time_fn: warmup must be >= 1 (the first call is never timed), got {warmup}"
        )
    method = _resolve_method(method)
    name = name or getattr(fn, "__name__", type(fn).__name__)

    compile_s = None
    if jit:
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
    else:
        compiled = fn

    n = rotation_copies(tree_bytes(args), rotate, l2_bytes=l2_bytes, max_bytes=max_rotate_bytes)
    copies = [tuple(args)] + [tuple(_copy_tree(args)) for _ in range(n - 1)]
    jax.block_until_ready(copies)

    t_call = 0.0
    out_bytes = 0
    for i in range(warmup):
        t0 = time.perf_counter()
        out = compiled(*copies[i % n])
        jax.block_until_ready(out)
        t_call = time.perf_counter() - t0
        if i == 0:
            out_bytes = tree_bytes(out)
            if inspect_output is not None:
                inspect_output(out)
        del out

    if max_seconds is not None and t_call * reps > max_seconds:
        reps = max(min_reps, min(reps, int(max_seconds / max(t_call, 1e-9))))

    start = warmup % n
    kernels: tuple[tuple[str, float], ...] = ()
    if method == "cupti":
        times, kernels = _measure_cupti(compiled, copies, start, reps, out_bytes, max_output_bytes)
    else:
        times = []
        for r in range(reps):
            copy = copies[(start + r) % n]
            t0 = time.perf_counter()
            out = compiled(*copy)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t0) * 1e3)
            del out
    return Timing(
        name=name,
        method=method,
        times_ms=tuple(times),
        copies=n,
        warmup=warmup,
        compile_s=compile_s,
        bytes_accessed=bytes_accessed,
        flops=flops,
        kernels=kernels,
    )


# ----------------------------------------------------------------------------------------- inputs


@functools.partial(jax.jit, static_argnames=("n", "row_shape", "dtype", "scale"))
def _random_rows(key, *, n, row_shape, dtype, scale):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32))
    size = math.prod(row_shape)  # flat rows: compiles much faster than multi-dimensional bits
    bits = jax.vmap(lambda k: jax.random.bits(k, (size,), jnp.uint32))(keys).reshape(n, *row_shape)
    # 23 random mantissa bits, the lowest forced to 1, exponent of [1, 2): f in (1, 2), never 1.5.
    f = lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800001), jnp.float32)
    u = (f - 1.5) * 2.0  # exact: uniform in (-1, 1), |u| >= 2**-22, never zero
    return (u * scale).astype(dtype)


def random_array(
    key: Any, shape: Sequence[int], dtype: Any = jnp.float32, *, scale: float = 1.0, axis: int = 0
) -> jax.Array:
    """Uniform random values in ``(-scale, scale)``, never zero, prefix-stable along ``axis``.

    Slice ``i`` along ``axis`` depends only on ``(key, i)`` and the other dimensions, never on
    ``shape[axis]``: ``random_array(k, (8, H))[:1]`` equals ``random_array(k, (1, H))`` bitwise. The
    values are made from random bits with exact float operations, so this holds on every backend.

    Args:
      key: a ``jax.random.key``, a legacy ``PRNGKey`` or an int seed.
      shape, dtype: of the result (a floating dtype).
      scale: positive; values lie in ``(-scale, scale)`` (before rounding to ``dtype``).
      axis: the prefix-stable axis (the batch/token axis of the benchmark).
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"random_array: dtype must be a floating dtype, got {dtype}")
    if not scale > 0:
        raise ValueError(f"random_array: scale must be positive, got {scale}")
    shape = tuple(int(s) for s in shape)
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    if not shape:
        return random_array(key, (1,), dtype, scale=scale)[0]
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"random_array: axis {axis} is out of range for shape {shape}")
    axis %= len(shape)
    row_shape = shape[:axis] + shape[axis + 1 :]
    rows = _random_rows(key, n=shape[axis], row_shape=row_shape, dtype=dtype, scale=float(scale))
    return jnp.moveaxis(rows, 0, axis)


# -------------------------------------------------------------------------------------- bandwidth


def copy_bandwidth(
    nbytes: int = 2**30, *, reps: int = 20, method: str = "auto", l2_bytes: int = L2_BYTES
) -> Timing:
    """Measured device-to-device copy: read ``nbytes`` and write ``nbytes`` (one XLA kernel).

    The copy is ``x ^ k`` on uint32 with ``k`` a runtime argument, so XLA cannot fold it away and it
    moves exactly ``2 * nbytes``. ``result.gbps`` is the achieved (read + write) bandwidth at the
    median, the figure the benchmarks compare memory-bound kernels against; ``bytes_accessed`` is
    ``2 * nbytes``.
    """
    n = max(1, int(nbytes) // 4)
    x = jax.random.bits(jax.random.key(0), (n,), jnp.uint32)
    k = jnp.asarray(0x9E3779B9, jnp.uint32)
    rotate = 1 if 4 * n >= 4 * l2_bytes else "auto"

    def copy(x, k):
        return x ^ k

    return time_fn(
        copy,
        x,
        k,
        reps=reps,
        rotate=rotate,
        method=method,
        name="copy (read + write)",
        bytes_accessed=2 * 4 * n,
        l2_bytes=l2_bytes,
    )


# ------------------------------------------------------------------------------------ environment


def _git(*cmd: str) -> str | None:
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        res = subprocess.run(
            ["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Where and when a measurement ran: device, versions, date (UTC) and git commit.

    The commit comes from ``git`` in the bi_jax checkout, or from ``$BI_JAX_COMMIT`` when set (for a
    copy of the tree without ``.git``); ``git_dirty`` says whether tracked files had local changes.
    """
    import jaxlib

    import bi_jax

    devices = jax.devices()
    commit = os.environ.get("BI_JAX_COMMIT") or _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    plugins = {}
    for dist in ("jax-cuda13-plugin", "jax-cuda12-plugin", "jax-cuda13-pjrt", "jax-cuda12-pjrt"):
        try:
            from importlib.metadata import version

            plugins[dist] = version(dist)
        except Exception:  # not installed
            continue
    return {
        "device": devices[0].device_kind if devices else None,
        "platform": devices[0].platform if devices else None,
        "device_count": len(devices),
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", None),
        "plugins": plugins,
        "bi_jax": getattr(bi_jax, "__version__", None),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "timing_method": "cupti" if cupti_available() else "wall",
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }
