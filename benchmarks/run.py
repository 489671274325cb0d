"""Run benchmark sweeps: ``python -m benchmarks.run <op> [<op> ...] [options]``.

ops: rmsnorm, rows, matmul, log_softmax, attention, decode, or all. Results (JSON, CSV, PNG, summary)
go to ``benchmarks/results`` (``--out`` to change). ``--quick`` runs tiny shapes with few
repetitions (on the CPU in under a minute per op) to test the harness itself. See
benchmarks/README.md.

Exit status: 0 when every bi_jax line ran and was bitwise invariant over its sweep, 1 otherwise
(XLA's variation is reported, never a failure), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import time
import warnings

OPS = {
    "rmsnorm": "benchmarks.rmsnorm",
    "rows": "benchmarks.rows",
    "matmul": "benchmarks.matmul",
    "log_softmax": "benchmarks.log_softmax",
    "attention": "benchmarks.attention",
    "decode": "benchmarks.decode",
}
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results"


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8,32, got {text!r}") from exc
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="bi_jax benchmark sweeps: XLA default vs bi_jax Pallas vs bi_jax reference.",
    )
    p.add_argument("ops", nargs="+", choices=[*OPS, "all"], help="op families to sweep")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 3 repetitions: tests the harness (runs on the CPU)")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--reps", type=int, default=None, help="timed calls per point (default 50)")
    p.add_argument("--max-point-s", type=float, default=None,
                   help="fewer reps (>= 3) where a call is slow: about this many seconds per point "
                        "(default 1.0)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new points after this many seconds (skipped points are "
                        "recorded); the reference line runs last")
    p.add_argument("--method", choices=["auto", "cupti", "wall"], default="auto",
                   help="auto: CUPTI kernel time on a GPU, wall clock elsewhere")
    p.add_argument("--xs", type=_ints, default=None,
                   help="x-axis values, e.g. 1,128,4096 (tokens / M / T / B, per op)")
    p.add_argument("--lines", default=None,
                   help="comma-separated subset of lines: xla,pallas,reference[,cudnn,jax_example]")
    p.add_argument("--reference-max", type=int, default=None,
                   help="skip the slow reference line above this x (0: never run it); default "
                        "per op: matmul M=256, attention B*T=4096, decode B=64, rows 64, others no limit")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="input dtype (default bfloat16)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run full-size sweeps without a GPU (Pallas in interpret mode: very slow)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g = p.add_argument_group("op-specific")
    g.add_argument("--hidden", type=int, default=None, help="rmsnorm, rows: hidden size (8192)")
    g.add_argument("--shapes", default=None,
                   help="matmul: KxN list, e.g. 4096x6144,14336x4096 (Llama-3-8B projections)")
    g.add_argument("--vocab", type=int, default=None, help="log_softmax, rows: vocabulary (128256)")
    g.add_argument("--batches", type=_ints, default=None,
                   help="attention: batch sizes, one panel each (1,2,4,8)")
    g.add_argument("--contexts", type=_ints, default=None,
                   help="decode: context lengths, one panel each (1024,4096,16384,32768)")
    g.add_argument("--max-scores-gb", type=float, default=10.0,
                   help="attention: skip the XLA line where its fp32 scores exceed this (10)")
    g.add_argument("--max-kv-gb", type=float, default=8.0,
                   help="decode: skip points whose KV cache exceeds this (8)")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    # Pallas' Triton backend warns that it is deprecated at every kernel: once is enough (pytest's
    # configuration filters the same warnings).
    warnings.filterwarnings("ignore", message=".*Triton backend.*deprecated.*")
    ops = list(OPS) if "all" in opts.ops else list(dict.fromkeys(opts.ops))

    import jax

    from benchmarks import common
    from bi_jax import _backend

    backend = jax.default_backend()
    if not _backend.has_gpu() and not opts.quick and not opts.allow_cpu:
        print(f"no GPU (jax backend {backend!r}): full-size sweeps would run the Pallas kernels in "
              "interpret mode for hours. Use --quick (harness test) or --allow-cpu.",
              file=sys.stderr)
        return 2
    settings = common.Settings(
        out_dir=opts.out or DEFAULT_OUT,
        reps=opts.reps or (3 if opts.quick else 50),
        max_point_s=opts.max_point_s or (0.5 if opts.quick else 1.0),
        budget_s=opts.budget_s,
        method=opts.method,
        quick=opts.quick,
        suffix="_quick" if opts.quick else "",
        progress=not opts.no_progress,
        copy_bytes=(16 * 2**20) if opts.quick else 2**30,
    )
    print(f"bi_jax benchmarks: {', '.join(ops)} on {jax.devices()[0].device_kind} "
          f"({backend}); results in {settings.out_dir}", flush=True)
    status = 0
    for op in ops:
        sweep = importlib.import_module(OPS[op]).build(opts)
        if opts.lines:
            want = [w.strip() for w in opts.lines.split(",") if w.strip()]
            have = {ln.key for ln in sweep.lines}
            unknown = [w for w in want if w not in have]
            if unknown:
                print(f"{op}: unknown lines {unknown}; this sweep has {sorted(have)}",
                      file=sys.stderr)
                return 2
            sweep.lines = [ln for ln in sweep.lines if ln.key in want]
        t0 = time.perf_counter()
        doc = common.run_sweep(sweep, settings)
        summary = pathlib.Path(doc["files"]["summary"]).read_text()
        print(summary, flush=True)
        print(f"[{op}] wrote {', '.join(str(v) for v in doc['files'].values() if v)} "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        if not doc["ok"]:
            status = 1
        if doc["interrupted"]:
            print(f"[{op}] interrupted: not starting the remaining sweeps", flush=True)
            return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
