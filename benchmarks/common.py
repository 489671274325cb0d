"""The sweep harness shared by every op family.

A ``Sweep`` is a list of ``Case``s (one chart panel each: a matmul shape, an attention batch size)
over an x axis (tokens, M, sequence length, batch) and a list of ``Line``s (implementations).
``run_sweep`` times every (x, case, line) point with ``bi_jax.timing.time_fn`` behind a tqdm bar,
keeps the leading rows of every output to check bitwise invariance over the sweep, and writes into
the output directory:

* ``<op>.json``: environment, copy bandwidth, settings, every point with its spread and metrics,
  the invariance report and the ratio tables;
* ``<op>.csv``: one row per point (with device, jax version, date and commit on every row);
* ``<op>.png``: one panel per case, time (ms) against x on log2/log axes, p10-p90 error bars;
* ``<op>_summary.txt`` and ``<op>_ratios.txt``: the printed tables.

Inputs come from ``timing.random_array``, which is prefix-stable along the batch axis: the rows at
the smallest x are the leading rows at every larger x, with the same shared operands (weights). So
the leading rows of every output can be compared bitwise with those at the smallest x: a
batch-invariant line gives identical bits at every x, XLA's default may not (reported, never
asserted).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from bi_jax import timing

TOKENS = tuple(2**i for i in range(14))  # 1, 2, 4, ..., 8192
QUICK_TOKENS = (1, 8, 32)

LABELS = {
    "xla": "XLA default (not batch-invariant)",
    "pallas": "bi_jax Pallas (batch-invariant)",
    "reference": "bi_jax reference (batch-invariant, plain jnp)",
}
STYLES = {
    "xla": {"color": "#1f77b4", "marker": "o"},
    "pallas": {"color": "#d62728", "marker": "s"},
    "reference": {"color": "#2ca02c", "marker": "^"},
    "cudnn": {"color": "#9467bd", "marker": "D"},
    "jax_example": {"color": "#8c564b", "marker": "v"},
}
# Lines run in this priority order: a time budget drops the slow reference first. Every line a
# Pallas ratio is quoted against runs at priority 0, so at each point the two times of a ratio are
# taken back to back (on an H100 one kernel's median moved by up to 9% between probes minutes
# apart, 2026-11-25).
PRIORITY = {"xla": 0, "pallas": 0, "cudnn": 0, "jax_example": 0, "reference": 2}


def coarse_to_fine(xs: Sequence[int]) -> list[int]:
    """``xs`` sorted, reordered smallest, largest, then midpoints by bisection.

    A sweep cut short by its time budget still spans the whole x range (with fewer points), and
    the smallest x, the reference of the invariance check, always runs first.
    """
    xs = sorted(set(xs))
    if len(xs) <= 2:
        return xs
    out = [xs[0], xs[-1]]
    queue = [(0, len(xs) - 1)]
    while queue:
        lo, hi = queue.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        out.append(xs[mid])
        queue += [(lo, mid), (mid, hi)]
    return out


# ------------------------------------------------------------------------------------ data model


@dataclasses.dataclass
class Line:
    """One implementation: ``make()`` builds the function to time (imports lazily; may raise)."""

    key: str
    label: str
    make: Callable[[], Callable[..., Any]]
    promises_invariance: bool = False
    skip: Callable[[Case, int], str | None] | None = None  # reason to skip a point, or None


@dataclasses.dataclass
class Case:
    """One chart panel: a fixed shape family over the x axis.

    ``inputs(x)`` returns the arguments (prefix-stable along the batch axis); ``head(out, n)`` the
    part of an output compared across the sweep (its leading ``n`` rows); ``metrics(x, timing,
    copy_gbps)`` extra columns (bandwidth, TFLOP/s).
    """

    name: str
    xs: tuple[int, ...]
    inputs: Callable[[int], tuple[Any, ...]]
    head: Callable[[Any, int], Any]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    bytes_accessed: Callable[[int], int] | None = None
    flops: Callable[[int], int] | None = None
    metrics: Callable[[int, timing.Timing, float | None], dict[str, Any]] | None = None
    skip: Callable[[int], str | None] | None = None  # skips every line at this x


@dataclasses.dataclass
class Sweep:
    op: str
    title: str
    x_label: str
    cases: list[Case]
    lines: list[Line]
    ratios: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (numerator, baseline)
    # (metric key, column header, format) of the metric columns of the printed tables
    table_metrics: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    markers: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # published points
    key_xs: list[int] = dataclasses.field(default_factory=list)  # run right after min and max x


@dataclasses.dataclass
class Settings:
    out_dir: pathlib.Path
    reps: int = 50
    warmup: int = 2  # untimed calls after compilation (XLA may record CUDA graphs on the first)
    max_point_s: float = 1.0
    budget_s: float | None = None
    method: str = "auto"
    quick: bool = False
    suffix: str = ""
    progress: bool = True
    copy_bytes: int = 2**30


# ------------------------------------------------------------------------------------ line helpers


def bi_op(name: str, module: str) -> Callable[..., Any]:
    """``bi_jax.<name>``, or a clear error when this checkout does not have it yet."""
    import bi_jax

    fn = getattr(bi_jax, name, None)
    if fn is None or not callable(fn):  # absent, or only the submodule of that name
        raise RuntimeError(
            f"bi_jax.{name} is not available in this checkout (expected in bi_jax/{module}.py)"
        )
    return fn


def standard_lines(
    factory: Callable[[str], Callable[[], Callable[..., Any]]],
    *,
    reference_max: int | None,
    x_name: str,
) -> list[Line]:
    """The three lines every sweep has: XLA default, bi_jax Pallas, bi_jax reference.

    ``factory(implementation)`` returns the ``make`` of a line. The reference line is skipped above
    ``x = reference_max`` (None: never skipped; 0: always).
    """

    def ref_skip(case: Case, x: int) -> str | None:
        if reference_max is not None and x > reference_max:
            return f"reference line skipped above {x_name}={reference_max} (--reference-max)"
        return None

    return [
        Line("xla", LABELS["xla"], factory("xla")),
        Line("pallas", LABELS["pallas"], factory("pallas"), promises_invariance=True),
        Line(
            "reference", LABELS["reference"], factory("reference"), promises_invariance=True,
            skip=ref_skip,
        ),
    ]


def reference_note(reference_max: int | None, x_name: str) -> list[str]:
    if reference_max is None:
        return []
    if reference_max <= 0:
        return ["reference line (plain jnp) not run (--reference-max 0)"]
    return [
        f"reference line (plain jnp, slow) runs only up to {x_name}={reference_max}; "
        "change with --reference-max"
    ]


def rows_head(out: Any, n: int) -> Any:
    """Leading ``n`` rows (axis 0) of every output leaf."""
    return jax.tree.map(lambda o: o[:n], out)


def bandwidth_metrics(x: int, t: timing.Timing, copy_gbps: float | None) -> dict[str, Any]:
    gbps = t.gbps
    return {
        "gbps": gbps,
        "frac_copy_bw": gbps / copy_gbps if gbps is not None and copy_gbps else None,
    }


# ------------------------------------------------------------------------------------- comparison


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def compare_heads(a: Any, b: Any) -> tuple[bool, int | None]:
    """(bitwise equal?, max ULP distance or None) between two pytrees of host arrays."""
    from bi_jax.testing import ulp_distance

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        return False, None
    equal, worst = True, 0
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, None
        if x.size == 0 or np.array_equal(_bits(x), _bits(y)):
            continue
        equal = False
        try:
            worst = max(worst, int(np.max(ulp_distance(x, y))))
        except (TypeError, KeyError, ValueError):
            worst = -1
    return equal, (0 if equal else worst)


# ------------------------------------------------------------------------------------------- run


def _short(exc: BaseException, limit: int = 600) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    tty = sys.stderr.isatty()
    return tqdm(
        total=total, desc=desc, unit="pt", file=sys.stderr, disable=not enabled,
        mininterval=0.5 if tty else 15.0, dynamic_ncols=True,
    )


def _say(bar, msg: str) -> None:
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr)


def run_sweep(sweep: Sweep, settings: Settings) -> dict[str, Any]:
    """Time every point of ``sweep``; write JSON/CSV/PNG/summary; return the JSON document.

    The document's ``ok`` is False when a bi_jax line (one that promises invariance) raised an error
    or gave different bits at some x; the XLA line's variation is only reported.
    """
    t_start = time.perf_counter()
    env = timing.environment()
    method = "cupti" if settings.method == "auto" and timing.cupti_available() else settings.method
    if method == "auto":
        method = "wall"

    copy_doc: dict[str, Any] | None
    try:
        bw = timing.copy_bandwidth(settings.copy_bytes, method=method)
        copy_doc = bw.to_dict()
        copy_gbps = bw.gbps
    except Exception as exc:  # reported; metrics relative to copy bandwidth become None
        copy_doc = {"error": _short(exc)}
        copy_gbps = None
        print(f"copy bandwidth measurement failed: {_short(exc)}", file=sys.stderr)

    # Points in priority order: XLA/Pallas and the baselines first, the slow reference last; x in
    # coarse-to-fine order; at one priority and x, the lines of a case run back to back (their
    # inputs are shared).
    xs_order = coarse_to_fine([x for c in sweep.cases for x in c.xs])
    key_xs = [x for x in sweep.key_xs if x in xs_order]
    xs_order = xs_order[:2] + key_xs + [x for x in xs_order[2:] if x not in key_xs]
    rank = {x: i for i, x in enumerate(xs_order)}
    order = []
    for li, line in enumerate(sweep.lines):
        for ci, case in enumerate(sweep.cases):
            for x in case.xs:
                order.append(((PRIORITY.get(line.key, 1), rank[x], ci, li), x, case, line))
    order.sort(key=lambda p: p[0])

    fns: dict[str, Callable[..., Any]] = {}
    fn_errors: dict[str, str] = {}
    heads: dict[tuple[str, str], tuple[int, Any]] = {}
    tracebacks_shown: set[tuple[str, str]] = set()
    points: list[dict[str, Any]] = []
    cached_inputs: dict[str, Any] = {"key": None, "args": None}
    bar = _progress(len(order), sweep.op, settings.progress)

    interrupted = False
    try:
        for _, x, case, line in order:
            rec: dict[str, Any] = {
                "case": case.name, "x": x, "line": line.key, "label": line.label,
                "status": "ok", "reason": None, "timing": None,
            }
            if bar is not None:
                bar.set_postfix_str(f"{line.key} {case.name} x={x}", refresh=False)
            reason = case.skip(x) if case.skip else None
            if reason is None and line.skip is not None:
                reason = line.skip(case, x)
            elapsed = time.perf_counter() - t_start
            if reason is None and settings.budget_s is not None and elapsed > settings.budget_s:
                reason = f"time budget of {settings.budget_s:.0f} s exhausted (--budget-s)"
            if reason is not None:
                rec.update(status="skipped", reason=reason)
            else:
                try:
                    if line.key in fn_errors:
                        raise RuntimeError(fn_errors[line.key])
                    if line.key not in fns:
                        try:
                            fns[line.key] = line.make()
                        except Exception as exc:
                            fn_errors[line.key] = f"could not build the line: {_short(exc)}"
                            raise RuntimeError(fn_errors[line.key]) from exc
                    if cached_inputs["key"] != (case.name, x):
                        cached_inputs.update(key=None, args=None)  # free the previous inputs first
                        cached_inputs.update(key=(case.name, x), args=case.inputs(x))
                    args = cached_inputs["args"]
                    n0 = min(case.xs)
                    captured: list[Any] = []

                    def keep_head(out, n0=n0, case=case, captured=captured):
                        captured.append(jax.tree.map(np.asarray, case.head(out, n0)))

                    t = timing.time_fn(
                        fns[line.key], *args,
                        reps=settings.reps,
                        warmup=settings.warmup,
                        method=method,
                        name=f"{sweep.op} {line.key} {case.name} x={x}",
                        bytes_accessed=case.bytes_accessed(x) if case.bytes_accessed else None,
                        flops=case.flops(x) if case.flops else None,
                        max_seconds=settings.max_point_s,
                        inspect_output=keep_head,
                    )
                    td = t.to_dict()
                    rec["timing"] = td
                    rec.update({k: td[k] for k in ("median_ms", "p10_ms", "p90_ms")})
                    if case.metrics is not None:
                        rec["metrics"] = case.metrics(x, t, copy_gbps)
                    head = captured[0]
                    ref = heads.get((case.name, line.key))
                    if ref is None:
                        heads[(case.name, line.key)] = (x, head)
                        rec.update(x0=x, bitwise_equal_to_x0=True, max_ulp_vs_x0=0)
                    else:
                        eq, ulp = compare_heads(ref[1], head)
                        rec.update(x0=ref[0], bitwise_equal_to_x0=eq, max_ulp_vs_x0=ulp)
                except Exception as exc:
                    rec.update(status="error", reason=_short(exc))
                    tb = traceback.format_exc()
                    rec["traceback"] = tb[-4000:]
                    sig = (line.key, type(exc).__name__)
                    if sig not in tracebacks_shown:
                        tracebacks_shown.add(sig)
                        _say(bar, f"\n[{sweep.op}] {line.key} {case.name} x={x} failed:\n{tb}")
            points.append(rec)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:  # SIGINT (e.g. timeout --signal=INT): keep what ran, write it out
        interrupted = True
        for _, x, case, line in order[len(points):]:
            points.append({"case": case.name, "x": x, "line": line.key, "label": line.label,
                           "status": "skipped", "reason": "interrupted (SIGINT)",
                           "timing": None})
        _say(bar, f"[{sweep.op}] interrupted: writing the {len(points)} points so far")
    cached_inputs.clear()
    if bar is not None:
        bar.close()

    # Sort points for output: case order, x, line order.
    case_idx = {c.name: i for i, c in enumerate(sweep.cases)}
    line_idx = {ln.key: i for i, ln in enumerate(sweep.lines)}
    points.sort(key=lambda p: (case_idx[p["case"]], p["x"], line_idx[p["line"]]))

    invariance = _invariance_report(sweep, points)
    ratios = _ratio_tables(sweep, points)
    bi_errors = [
        p for p in points
        if p["status"] == "error" and _line(sweep, p["line"]).promises_invariance
    ]
    ok = not bi_errors and all(r["ok"] for r in invariance)
    doc = {
        "op": sweep.op,
        "title": sweep.title,
        "x_label": sweep.x_label,
        "env": env,
        "copy_bandwidth": copy_doc,
        "settings": {
            "reps": settings.reps, "max_point_s": settings.max_point_s,
            "budget_s": settings.budget_s, "method": method, "quick": settings.quick,
            "copy_bytes": settings.copy_bytes,
        },
        "cases": [{"name": c.name, "xs": list(c.xs), **c.params} for c in sweep.cases],
        "lines": {ln.key: {"label": ln.label, "promises_invariance": ln.promises_invariance}
                  for ln in sweep.lines},
        "notes": list(sweep.notes),
        "markers": list(sweep.markers),
        "points": points,
        "invariance": invariance,
        "ratios": ratios,
        "ok": ok,
        "interrupted": interrupted,
        "wall_s": time.perf_counter() - t_start,
    }
    write_outputs(sweep, doc, settings)
    return doc


def _line(sweep: Sweep, key: str) -> Line:
    return next(ln for ln in sweep.lines if ln.key == key)


def _invariance_report(sweep: Sweep, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (case, line): did the leading rows keep their bits over every x that ran?"""
    out = []
    for case in sweep.cases:
        for line in sweep.lines:
            ran = [p for p in points
                   if p["case"] == case.name and p["line"] == line.key and p["status"] == "ok"]
            differs = [p["x"] for p in ran if not p["bitwise_equal_to_x0"]]
            ulps = [p["max_ulp_vs_x0"] for p in ran if p["max_ulp_vs_x0"] is not None]
            checked = len(ran) >= 2
            out.append({
                "case": case.name,
                "line": line.key,
                "promises_invariance": line.promises_invariance,
                "x0": ran[0]["x0"] if ran else None,
                "xs": [p["x"] for p in ran],
                "differs_at": differs,
                "max_ulp": max(ulps) if ulps else None,
                "checked": checked,
                # Only lines that promise invariance can fail the run.
                "ok": not (line.promises_invariance and differs),
            })
    return out


def _geomean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def _ratio_tables(sweep: Sweep, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(p["case"], p["x"], p["line"]): p for p in points if p["status"] == "ok"}
    keys = {ln.key for ln in sweep.lines}
    tables = []
    for num, den in sweep.ratios:
        if num not in keys or den not in keys:
            continue
        rows = []
        for case in sweep.cases:
            for x in case.xs:
                a, b = by.get((case.name, x, num)), by.get((case.name, x, den))
                if a and b:
                    rows.append({
                        "case": case.name, "x": x, "num_ms": a["median_ms"],
                        "den_ms": b["median_ms"], "ratio": a["median_ms"] / b["median_ms"],
                    })
        geo = {c.name: _geomean([r["ratio"] for r in rows if r["case"] == c.name])
               for c in sweep.cases}
        geo["all"] = _geomean([r["ratio"] for r in rows])
        tables.append({"num": num, "den": den, "rows": rows, "geomean": geo})
    return tables


# ------------------------------------------------------------------------------------------ output


CSV_BASE = [
    "op", "case", "x", "line", "status", "median_ms", "p10_ms", "p90_ms", "min_ms", "max_ms",
    "mean_ms", "std_ms", "reps", "copies", "method", "compile_s", "bytes_accessed", "flops",
    "gbps", "tflops",
]
CSV_TAIL = [
    "bitwise_equal_to_x0", "x0", "max_ulp_vs_x0", "reason", "label", "device", "jax", "date",
    "git_commit",
]


def write_outputs(sweep: Sweep, doc: dict[str, Any], settings: Settings) -> dict[str, pathlib.Path]:
    out = pathlib.Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = f"{sweep.op}{settings.suffix}"
    paths = {
        "json": out / f"{base}.json",
        "csv": out / f"{base}.csv",
        "png": out / f"{base}.png",
        "summary": out / f"{base}_summary.txt",
        "ratios": out / f"{base}_ratios.txt",
    }
    summary, ratio_text = format_summary(sweep, doc)
    doc["files"] = {k: str(v) for k, v in paths.items()}
    try:
        plot(sweep, doc, paths["png"])
    except Exception as exc:  # a chart failure must not lose the numbers
        print(f"chart failed: {_short(exc)}", file=sys.stderr)
        traceback.print_exc()
        doc["files"]["png"] = None
        doc["png_error"] = _short(exc)
    paths["json"].write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    _write_csv(doc, paths["csv"])
    paths["summary"].write_text(summary + "\n")
    paths["ratios"].write_text(ratio_text + "\n")
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _write_csv(doc: dict[str, Any], path: pathlib.Path) -> None:
    metric_keys: list[str] = []
    for p in doc["points"]:
        for k in p.get("metrics") or {}:
            if k not in metric_keys and k not in CSV_BASE:
                metric_keys.append(k)
    fields = CSV_BASE + metric_keys + CSV_TAIL
    env = doc["env"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for p in doc["points"]:
            t = p.get("timing") or {}
            row = {k: t.get(k) for k in CSV_BASE if k in t}
            row["reps"] = len(t["times_ms"]) if t else None
            row.update(op=doc["op"], case=p["case"], x=p["x"], line=p["line"], status=p["status"])
            row.update({k: v for k, v in (p.get("metrics") or {}).items() if k in fields})
            row.update({k: p.get(k) for k in ("bitwise_equal_to_x0", "x0", "max_ulp_vs_x0",
                                               "reason", "label")})
            row.update(device=env.get("device"), jax=env.get("jax"), date=env.get("date"),
                       git_commit=env.get("git_commit"))
            w.writerow(row)


def _fmt(v: Any, fmt: str = "{:.4g}") -> str:
    if v is None:
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def _table(header: list[str], rows: list[list[str]], left: int = 0) -> str:
    """Aligned text table; the first ``left`` columns are left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    return "\n".join(lines)


def format_summary(sweep: Sweep, doc: dict[str, Any]) -> tuple[str, str]:
    """(full summary text, ratio tables text); the ratio tables come last in the summary."""
    env = doc["env"]
    copy = doc["copy_bandwidth"] or {}
    parts = [
        f"== {sweep.op}: {sweep.title}",
        f"device {env.get('device')} ({env.get('platform')}), jax {env.get('jax')}, "
        f"jaxlib {env.get('jaxlib')}, {env.get('date')}, commit {env.get('git_commit')}"
        f"{' (dirty)' if env.get('git_dirty') else ''}, timing {doc['settings']['method']}",
        "copy bandwidth (read+write): "
        + (f"{copy['gbps']:.0f} GB/s (median of {len(copy['times_ms'])}, "
           f"{copy['bytes_accessed'] / 2**30:.2f} GiB moved)"
           if copy.get("gbps") else f"not measured ({copy.get('error')})"),
    ]
    parts += [f"note: {n}" for n in sweep.notes]
    by = {(p["case"], p["x"], p["line"]): p for p in doc["points"]}
    keys = [ln.key for ln in sweep.lines]
    for case in sweep.cases:
        header = [sweep.x_label.split(" ")[0]] + [f"{k} ms (p10-p90)" for k in keys]
        for _, mh, _ in sweep.table_metrics:
            header += [f"{k} {mh}" for k in keys]
        rows = []
        for x in case.xs:
            row = [str(x)]
            for k in keys:
                p = by.get((case.name, x, k))
                if p is None or p["status"] != "ok":
                    row.append({"skipped": "skip", "error": "ERROR"}.get(
                        p["status"] if p else "", "-"))
                else:
                    row.append(f"{p['median_ms']:.4f} ({p['p10_ms']:.4f}-{p['p90_ms']:.4f})")
            for mk, _, mf in sweep.table_metrics:
                for k in keys:
                    p = by.get((case.name, x, k))
                    v = (p.get("metrics") or {}).get(mk) if p and p["status"] == "ok" else None
                    row.append(_fmt(v, mf))
            rows.append(row)
        parts += ["", f"-- {case.name}: median time (ms)", _table(header, rows)]

    parts += ["", "-- bitwise invariance over the sweep (leading rows vs the smallest x)"]
    for r in doc["invariance"]:
        tag = f"{r['line']:<12} [{r['case']}]"
        if not r["xs"]:
            parts.append(f"{tag}: no point ran")
        elif not r["checked"]:
            parts.append(f"{tag}: only x={r['xs'][0]} ran, nothing to compare")
        elif r["differs_at"]:
            what = "NOT INVARIANT (bug!)" if r["promises_invariance"] else "varies"
            parts.append(f"{tag}: {what}: differs from x={r['x0']} at x={r['differs_at']} "
                         f"(max {r['max_ulp']} ULP)")
        else:
            what = "bitwise invariant" if r["promises_invariance"] else "did not vary"
            parts.append(f"{tag}: {what} over x={r['xs'][0]}..{r['xs'][-1]} "
                         f"({len(r['xs'])} points)")

    skipped: dict[tuple[str, str], list[int]] = {}
    errors = []
    for p in doc["points"]:
        if p["status"] == "skipped":
            skipped.setdefault((p["line"], p["reason"]), []).append(p["x"])
        elif p["status"] == "error":
            errors.append(p)
    if skipped:
        parts += ["", "-- skipped points"]
        parts += [f"{line}: {reason} (x={sorted(set(xs))})"
                  for (line, reason), xs in skipped.items()]
    if errors:
        parts += ["", f"-- ERRORS ({len(errors)} points)"]
        grouped: dict[tuple[str, str], list[str]] = {}
        for p in errors:
            grouped.setdefault((p["line"], p["reason"]), []).append(f"[{p['case']}] x={p['x']}")
        for (line, reason), where in grouped.items():
            more = f" and {len(where) - 6} more" if len(where) > 6 else ""
            parts.append(f"{line}: {reason}\n    at {', '.join(where[:6])}{more}")

    compile_s: dict[str, float] = {}
    for p in doc["points"]:
        if p["status"] == "ok" and p["timing"].get("compile_s") is not None:
            compile_s[p["line"]] = compile_s.get(p["line"], 0.0) + p["timing"]["compile_s"]
    if compile_s:
        parts.append("compile time per line: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in compile_s.items()))

    ratio_parts = []
    for t in doc["ratios"]:
        ratio_parts += [
            "",
            f"-- [{sweep.op}] ratio {t['num']} / {t['den']} (median time; < 1: {t['num']} faster)",
        ]
        rows = [[r["case"], str(r["x"]), f"{r['den_ms']:.4f}", f"{r['num_ms']:.4f}",
                 f"{r['ratio']:.3f}"] for r in t["rows"]]
        if rows:
            ratio_parts.append(_table(
                ["case", "x", f"{t['den']} ms", f"{t['num']} ms", "ratio"], rows, left=1))
        else:
            ratio_parts.append(f"(no x where both {t['num']} and {t['den']} ran)")
        for name, g in t["geomean"].items():
            n = len([r for r in t["rows"] if name == "all" or r["case"] == name])
            ratio_parts.append(f"geometric mean [{name}]: {_fmt(g, '{:.3f}')} ({n} points)")
    status = "OK" if doc["ok"] else "FAILED (a bi_jax line errored or was not invariant)"
    if doc.get("interrupted"):
        status += "; INTERRUPTED: partial results"
    parts += ["", f"status: {status}; wall {doc['wall_s']:.0f} s"]
    ratio_text = "\n".join(ratio_parts).strip("\n")
    return "\n".join(parts + ratio_parts), ratio_text


def plot(sweep: Sweep, doc: dict[str, Any], path: pathlib.Path) -> None:
    """One panel per case: median time (ms) against x, p10-p90 error bars, published markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    n = len(sweep.cases)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    size = (max(9.0, 6.8 * ncols), 4.8 * nrows + 0.6)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    by = {(p["case"], p["x"], p["line"]): p for p in doc["points"] if p["status"] == "ok"}
    for i, case in enumerate(sweep.cases):
        ax = axes[i // ncols][i % ncols]
        for line in sweep.lines:
            pts = [by[(case.name, x, line.key)] for x in case.xs if (case.name, x, line.key) in by]
            if not pts:
                continue
            xs = [p["x"] for p in pts]
            med = np.array([p["median_ms"] for p in pts])
            lo = med - np.array([p["p10_ms"] for p in pts])
            hi = np.array([p["p90_ms"] for p in pts]) - med
            style = STYLES.get(line.key, {})
            ax.errorbar(xs, med, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], label=line.label,
                        capsize=2, linewidth=1.5, markersize=4, **style)
        lo_x, hi_x = min(case.xs), max(case.xs)
        for m in sweep.markers:
            if m.get("case") not in (None, case.name) or not lo_x <= m["x"] <= hi_x:
                continue
            ax.scatter([m["x"]], [m["ms"]], marker=m.get("marker", "*"), s=110,
                       color=m.get("color", "black"), zorder=5,
                       label=f"{m['label']}: {m['ms']} ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(case.xs))
        ax.set_xticklabels([str(x) for x in case.xs], fontsize=7)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(sweep.x_label)
        ax.set_ylabel("time (ms)")
        ax.set_title(case.name, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no point ran", transform=ax.transAxes, ha="center")
    for j in range(n, nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    env = doc["env"]
    commit = (env.get("git_commit") or "unknown")[:10]
    fig.suptitle(
        f"{sweep.title}\n{env.get('device')} - jax {env.get('jax')} - {env.get('date')}\n"
        f"commit {commit} - timing {doc['settings']['method']} - median with p10-p90 bars",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

