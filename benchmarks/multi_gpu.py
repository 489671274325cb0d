"""Multi-GPU invariance check and timing of ``bi_jax.parallel`` (row-parallel linear, data parallelism).

Run from the repository root on a machine with 2 or more GPUs::

    PYTHONPATH=. python3 benchmarks/multi_gpu.py [--quick]

For every device count D (1, 2, 4, ... up to the GPUs available) it

1. checks, bitwise, that ``row_parallel_linear`` (fixed-order combine) gives every row the same bits
   for M in (1, 8, 64, 512, 4096) at K = N = 4096 bf16 (rows of the M-row call vs the first M rows of
   the 4096-row call), and reports whether the ``psum`` variant does (it promises nothing; with D = 2
   a two-term sum cannot depend on the order, so it can only vary from D = 3 up);
2. checks that data parallelism (``data_parallel`` of ``bi_jax.matmul`` and ``bi_jax.rms_norm``)
   gives each row the bits of the one-device op;
3. times the row-parallel linear with the fixed-order combine vs psum (wall clock per call, median,
   ``bi_jax.timing.time_fn``; the wall clock includes the collectives and the host dispatch).

Exits 1 if a bi_jax path (fixed combine or data parallelism) is not invariant.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see the device notes)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bi_jax  # noqa: E402
from bi_jax import parallel, timing  # noqa: E402

SIZES = (1, 8, 64, 512, 4096)
K = N = 4096


def device_counts(n: int) -> list[int]:
    counts = [d for d in (1, 2, 4, 8) if d <= n]
    return sorted(set(counts) | {n})


def first_mismatch(ys: dict[int, np.ndarray], full: np.ndarray) -> str | None:
    """The first M whose rows differ bitwise from the first M rows of ``full`` (None if all agree)."""
    for m, y in ys.items():
        a, b = y.view(np.uint16), full[:m].view(np.uint16)
        if not np.array_equal(a, b):
            rows = np.nonzero((a != b).any(axis=-1))[0]
            return f"M={m}: {len(rows)} of {m} rows differ (first row {rows[0]})"
    return None


def check_row_parallel(mesh, x, w, b, combine, impl) -> str | None:
    ys = {}
    for m in SIZES:
        y = parallel.row_parallel_linear(x[:m], w, b, mesh=mesh, combine=combine, implementation=impl)
        ys[m] = np.asarray(jax.device_get(y))
    return first_mismatch(ys, ys[max(SIZES)])


def check_data_parallel(mesh, x, w, b, g, impl) -> str | None:
    mm = parallel.data_parallel(lambda x, w, b: bi_jax.matmul(x, w, bias=b, implementation=impl), mesh)
    nrm = parallel.data_parallel(lambda x, g: bi_jax.rms_norm(x, g, implementation=impl), mesh)
    dev0 = jax.devices()[0]
    one_mm = np.asarray(jax.jit(lambda x, w, b: bi_jax.matmul(x, w, bias=b, implementation=impl))(
        *jax.device_put((x, w, b), dev0)))
    one_nrm = np.asarray(jax.jit(lambda x, g: bi_jax.rms_norm(x, g, implementation=impl))(
        *jax.device_put((x, g), dev0)))
    bad = first_mismatch({m: np.asarray(mm(x[:m], w, b)) for m in SIZES}, one_mm)
    if bad:
        return "matmul " + bad
    bad = first_mismatch({m: np.asarray(nrm(x[:m], g)) for m in SIZES}, one_nrm)
    return "rms_norm " + bad if bad else None


def time_row_parallel(mesh, x, w, b, combine, impl, reps) -> float:
    def fn(x, w, b):
        return parallel.row_parallel_linear(x, w, b, mesh=mesh, combine=combine, implementation=impl)

    try:
        t = timing.time_fn(fn, x, w, b, reps=reps, method="wall", rotate="auto", max_seconds=5.0)
    except Exception:  # the rotation copies may not keep the sharding: time without them
        t = timing.time_fn(fn, x, w, b, reps=reps, method="wall", rotate=None, max_seconds=5.0)
    return t.median_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--implementation", default=None, help="bi_jax implementation (default: pallas on GPU)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--timing-sizes", default="1,64,4096", help="M values to time (comma separated)")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args(argv)
    impl = args.implementation
    t_start = time.perf_counter()

    devices = jax.devices()
    print(f"bi_jax multi-GPU check: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
          f"jax {jax.__version__}, implementation={impl or 'default'}, K=N={K} bf16, M in {SIZES}, "
          f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}")
    if len(devices) < 2:
        print("WARNING: fewer than 2 devices: only D=1 is checked")

    mmax = max(SIZES)
    x_host = timing.random_array(0, (mmax, K), jnp.bfloat16)  # prefix-stable rows
    w_host = timing.random_array(1, (K, N), jnp.bfloat16, scale=K**-0.5)
    b_host = timing.random_array(2, (N,), jnp.bfloat16)
    g_host = timing.random_array(3, (K,), jnp.float32)

    failures = []
    results = []  # (D, fixed, psum, dp)
    for d in device_counts(len(devices)):
        mesh = parallel.make_mesh(d)
        fixed = check_row_parallel(mesh, x_host, w_host, b_host, "fixed", impl)
        psum = check_row_parallel(mesh, x_host, w_host, b_host, "psum", impl)
        dp = check_data_parallel(mesh, x_host, w_host, b_host, g_host, impl)
        results.append((d, fixed, psum, dp))
        print(f"D={d}: row_parallel fixed: {'INVARIANT' if fixed is None else 'NOT INVARIANT: ' + fixed}; "
              f"psum: {'invariant here' if psum is None else 'VARIES: ' + psum}; "
              f"data parallel: {'INVARIANT' if dp is None else 'NOT INVARIANT: ' + dp}", flush=True)
        if fixed is not None:
            failures.append(f"row_parallel_linear (fixed combine) D={d}: {fixed}")
        if dp is not None:
            failures.append(f"data parallelism D={d}: {dp}")

    if not args.no_timing:
        tsizes = [int(s) for s in args.timing_sizes.split(",")]
        print(f"\nrow_parallel_linear K=N={K} bf16, median wall ms per call ({args.reps} reps)")
        print(f"{'D':>3} {'M':>6} {'fixed (ms)':>11} {'psum (ms)':>10} {'fixed/psum':>10}")
        for d in device_counts(len(devices)):
            mesh = parallel.make_mesh(d)
            for m in tsizes:
                t_fixed = time_row_parallel(mesh, x_host[:m], w_host, b_host, "fixed", impl, args.reps)
                t_psum = time_row_parallel(mesh, x_host[:m], w_host, b_host, "psum", impl, args.reps)
                print(f"{d:>3} {m:>6} {t_fixed:>11.4f} {t_psum:>10.4f} {t_fixed / t_psum:>10.2f}", flush=True)

    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    if failures:
        print("FAIL: bi_jax parallel path not batch-invariant:\n  " + "\n  ".join(failures))
        return 1
    print("OK: row_parallel_linear (fixed combine) and data parallelism are batch-invariant "
          f"for every device count in {[r[0] for r in results]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
