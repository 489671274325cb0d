"""The benchmark harness (benchmarks/): quick matmul and row-op sweeps end to end, the sweep logic,
the copy floor.

The quick sweep runs the real CLI (``python -m benchmarks.run matmul --quick``) on tiny shapes and
checks that JSON, CSV, PNG and summary are written and well-formed; the toy sweeps check invariance
detection, skips, errors, the time budget and the ratio tables without any bi_jax kernel.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import common, copy_floor, rows, run, split_size, wgmma_bits  # noqa: E402
from bi_jax import _backend as be  # noqa: E402
from bi_jax import timing  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path: pathlib.Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200


def test_matmul_quick_sweep_end_to_end(tmp_path):
    rc = run.main(["matmul", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0, (tmp_path / "matmul_quick_summary.txt").read_text()
    files = {p.name for p in tmp_path.iterdir()}
    assert {"matmul_quick.json", "matmul_quick.csv", "matmul_quick.png",
            "matmul_quick_summary.txt", "matmul_quick_ratios.txt"} <= files

    doc = json.loads((tmp_path / "matmul_quick.json").read_text())
    assert doc["op"] == "matmul" and doc["ok"] is True
    for key in ("device", "jax", "date", "git_commit"):
        assert key in doc["env"]
    assert doc["copy_bandwidth"]["gbps"] > 0
    lines = {"xla", "pallas", "reference"}
    assert set(doc["lines"]) == lines
    n_cases, n_x = len(doc["cases"]), len(common.QUICK_TOKENS)
    assert len(doc["points"]) == n_cases * n_x * len(lines)
    for p in doc["points"]:
        assert p["status"] == "ok", p
        t = timing.Timing.from_dict(p["timing"])
        assert t.reps == 3 and t.min_ms <= p["median_ms"] <= t.max_ms
        assert p["p10_ms"] <= p["median_ms"] <= p["p90_ms"]
        assert p["metrics"]["tflops"] > 0 and p["metrics"]["weight_gbps"] > 0
    for r in doc["invariance"]:
        assert r["checked"]
        if r["promises_invariance"]:
            assert r["ok"] and not r["differs_at"], r
    pallas_vs_xla = next(t for t in doc["ratios"] if (t["num"], t["den"]) == ("pallas", "xla"))
    assert len(pallas_vs_xla["rows"]) == n_cases * n_x and pallas_vs_xla["geomean"]["all"] > 0

    with (tmp_path / "matmul_quick.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["points"])
    for col in ("median_ms", "p10_ms", "p90_ms", "min_ms", "max_ms", "tflops", "weight_gbps",
                "device", "jax", "date", "git_commit", "bitwise_equal_to_x0"):
        assert col in rows[0], col
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert {int(r["x"]) for r in rows} == set(common.QUICK_TOKENS)

    _check_png(tmp_path / "matmul_quick.png")
    summary = (tmp_path / "matmul_quick_summary.txt").read_text()
    assert "ratio pallas / xla" in summary and "geometric mean [all]" in summary
    assert "bitwise invariant" in summary
    # The ratio tables are printed last.
    assert summary.rstrip().endswith((tmp_path / "matmul_quick_ratios.txt").read_text().rstrip())


def test_rows_quick_sweep_runs_each_op(tmp_path):
    """The row-op sweep: every panel runs its own op (each case's input names it), every bi_jax
    point is invariant, and a panel's function is the public op it names."""
    assert run.main(["rows", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "rows_quick.json").read_text())
    assert doc["ok"] is True
    assert [c["op"] for c in doc["cases"]] == ["rms_norm", "layer_norm", "softmax", "softmax",
                                               "sum", "mean"]
    assert all(p["status"] == "ok" for p in doc["points"] if p["line"] != "reference")

    import bi_jax

    sweep = rows.build(run.parser().parse_args(["rows", "--quick"]))
    fn = rows._call("reference")
    for case in sweep.cases:
        (d,) = case.inputs(3)
        ((name, args),) = d.items()
        direct = getattr(bi_jax, name)(*args, implementation="reference")
        np.testing.assert_array_equal(np.asarray(fn(d)), np.asarray(direct))
        assert np.asarray(direct).shape[0] == 3


def _toy_sweep(*, pallas_fn=None, budget_breaker=False) -> common.Sweep:
    """rows x 8 inputs; 'xla' varies with the row count, 'pallas' is invariant, 'reference' fails
    to build, 'cudnn' is skipped above x = 4."""

    def varies(x):  # the bits of every row depend on the number of rows
        return x * (1.0 + x.shape[0] * 2.0**-12)

    def fail():
        raise ImportError("no such op")

    lines = [
        common.Line("xla", "toy xla", lambda: varies),
        common.Line("pallas", "toy pallas", lambda: pallas_fn or (lambda x: x * 2.0),
                    promises_invariance=True),
        common.Line("reference", "toy reference", fail, promises_invariance=True),
        common.Line("cudnn", "toy extra", lambda: (lambda x: x + 1.0),
                    skip=lambda case, x: "too big" if x > 4 else None),
    ]
    case = common.Case(
        name="toy",
        xs=(1, 4, 16),
        inputs=lambda x: (timing.random_array(0, (x, 8), jnp.float32),),
        head=common.rows_head,
        bytes_accessed=lambda x: 2 * x * 8 * 4,
        metrics=common.bandwidth_metrics,
    )
    return common.Sweep(
        op="toy", title="toy sweep", x_label="rows", cases=[case], lines=lines,
        ratios=[("pallas", "xla"), ("reference", "xla")],
        table_metrics=[("gbps", "GB/s", "{:.2f}")],
        markers=[{"x": 4, "ms": 0.5, "label": "published"}],
    )


def _settings(tmp_path, **kw) -> common.Settings:
    return common.Settings(out_dir=tmp_path, reps=3, max_point_s=0.2, method="wall",
                           progress=False, copy_bytes=2**20, **kw)


def test_toy_sweep_reports_variation_skips_and_errors(tmp_path):
    doc = common.run_sweep(_toy_sweep(), _settings(tmp_path))
    inv = {r["line"]: r for r in doc["invariance"]}
    assert inv["xla"]["differs_at"] == [4, 16] and inv["xla"]["ok"]  # reported, not a failure
    assert inv["xla"]["max_ulp"] > 0
    assert inv["pallas"]["differs_at"] == [] and inv["pallas"]["checked"]
    assert inv["cudnn"]["xs"] == [1, 4]
    status = {(p["line"], p["x"]): p["status"] for p in doc["points"]}
    assert status[("cudnn", 16)] == "skipped"
    assert all(status[("reference", x)] == "error" for x in (1, 4, 16))
    assert doc["ok"] is False  # a bi_jax line (reference) errored
    ref_err = next(p for p in doc["points"] if p["line"] == "reference")
    assert "no such op" in ref_err["reason"]
    ratio = next(t for t in doc["ratios"] if t["num"] == "pallas")
    assert len(ratio["rows"]) == 3 and ratio["geomean"]["all"] > 0
    summary = pathlib.Path(doc["files"]["summary"]).read_text()
    assert "varies" in summary and "ERRORS" in summary and "too big" in summary
    assert "no x where both reference and xla ran" in summary
    _check_png(tmp_path / "toy.png")
    with (tmp_path / "toy.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and "gbps" in rows[0] and "frac_copy_bw" in rows[0]


def test_toy_sweep_flags_a_variant_bi_jax_line(tmp_path):
    doc = common.run_sweep(
        _toy_sweep(pallas_fn=lambda x: x * (1.0 + x.shape[0] * 2.0**-12)),
        _settings(tmp_path),
    )
    inv = {r["line"]: r for r in doc["invariance"]}
    assert inv["pallas"]["differs_at"] == [4, 16] and not inv["pallas"]["ok"]
    assert "NOT INVARIANT" in pathlib.Path(doc["files"]["summary"]).read_text()


def test_time_budget_skips_remaining_points(tmp_path):
    doc = common.run_sweep(_toy_sweep(), _settings(tmp_path, budget_s=0.0))
    assert all(p["status"] == "skipped" for p in doc["points"])
    assert any("time budget" in (p["reason"] or "") for p in doc["points"])
    assert json.loads((tmp_path / "toy.json").read_text())["points"]


def test_compare_heads():
    a = {"o": np.array([[1.0, 2.0]], np.float32)}
    assert common.compare_heads(a, {"o": a["o"].copy()}) == (True, 0)
    b = {"o": np.nextafter(a["o"], np.float32(10.0))}
    assert common.compare_heads(a, b) == (False, 1)
    assert common.compare_heads(a, {"o": a["o"][:, :1]})[0] is False


def test_cli_refuses_full_size_on_cpu_and_bad_lines(tmp_path, capsys):
    from bi_jax import _backend

    if not _backend.has_gpu():
        assert run.main(["rmsnorm", "--out", str(tmp_path)]) == 2
    assert run.main(["rmsnorm", "--quick", "--lines", "xla,bogus", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        run.main(["nosuchop"])


def test_copy_floor_prints_one_row_per_size(capsys):
    """``python -m benchmarks.copy_floor`` on tiny sizes (wall clock on the CPU): a row per size,
    with positive times and bandwidths."""
    assert copy_floor.main(["--mb", "0.25,1", "--reps", "3", "--big-mib", "4"]) == 0
    out = capsys.readouterr().out
    assert "copy of 4 MiB (read + write)" in out
    rows = [line.split() for line in out.splitlines() if line[:1] == " " and "%" in line]
    assert [float(r[0]) for r in rows] == [0.25, 1.0]
    for r in rows:
        assert all(float(x) > 0 for x in (r[1], r[2], r[4], r[5]))


@pytest.mark.skipif(be.is_hopper(), reason="on Hopper the benchmark runs (see gpu_run.sh)")
def test_split_size_needs_the_mosaic_kernel():
    """``python -m benchmarks.split_size`` times Mosaic configs only: elsewhere it stops at once,
    naming the config it got, rather than timing the Triton kernel under that name."""
    with pytest.raises(SystemExit, match="needs the Mosaic kernel.*kernel='triton'"):
        split_size.main(["--reps", "3"])


def test_wgmma_bits_lowers_for_cuda():
    """``python -m benchmarks.wgmma_bits``: its one kernel lowers for the GPU (CI has none; the
    interpreter cannot run a wgmma with a register operand or an initialised accumulator)."""
    args = [jax.ShapeDtypeStruct(s, d) for s, d in wgmma_bits.IN_SHAPES]
    assert be.mosaic_kernel_count(be.export_for_cuda(wgmma_bits.products, *args)) == 1


@pytest.mark.skipif(be.is_hopper(), reason="on Hopper the probe runs")
def test_wgmma_bits_needs_hopper():
    with pytest.raises(SystemExit, match="needs a Hopper GPU"):
        wgmma_bits.main([])
