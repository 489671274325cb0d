"""Execute every notebook in ``notebooks/`` top to bottom; fail on any cell error.

Each notebook runs in a copy inside a temporary directory (the committed file is never touched), in
a Jupyter kernel started from this interpreter (``sys.executable``, so the kernel sees the same
environment as pytest, whatever kernelspecs the machine has installed), with a timeout per cell.

To re-execute the notebooks in place and store their outputs (after changing one, or to refresh
the stored outputs on another machine)::

    .venv/bin/python tests/test_notebooks.py --write             # all notebooks
    .venv/bin/python tests/test_notebooks.py --write 02_flax_model.ipynb
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 240  # per cell; each notebook runs in about a minute on a 2-core CPU
KERNEL_NAME = "bi_jax-notebook-test"


def _kernel_manager(spec_root: pathlib.Path):
    """A kernel manager whose only kernelspec runs ipykernel in this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = spec_root / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": f"Python ({sys.executable})",
                "language": "python",
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(spec_root)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def execute(path: pathlib.Path, workdir: pathlib.Path, *, timeout: int = CELL_TIMEOUT_S):
    """Execute the notebook at ``path`` with ``workdir`` as the kernel's working directory.

    Returns the executed notebook (a ``nbformat.NotebookNode``); raises
    ``nbclient.exceptions.CellExecutionError`` on the first failing cell.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        km=_kernel_manager(workdir / ".kernelspec"),
        timeout=timeout,
        allow_errors=False,
        record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    try:
        client.execute()
    finally:
        shutil.rmtree(workdir / ".kernelspec", ignore_errors=True)
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }
    return nb


def _errors(nb) -> list[str]:
    """Error outputs left in an executed notebook (there should be none)."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {i}: {out.get('ename')}: {out.get('evalue')}")
    return found


def test_notebooks_exist():
    assert NOTEBOOKS == ["01_batch_invariance.ipynb", "02_flax_model.ipynb", "03_benchmarks.ipynb"], NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    pytest.importorskip("flax")
    copy = tmp_path / name
    shutil.copy(NOTEBOOK_DIR / name, copy)
    nb = execute(copy, tmp_path)
    assert not _errors(nb), _errors(nb)
    shutil.rmtree(tmp_path, ignore_errors=True)  # the copy, and anything the notebook wrote


@pytest.mark.slow
def test_benchmark_notebook_draws_results(tmp_path, monkeypatch):
    """03_benchmarks.ipynb on a real (tiny, --quick) sweep result: charts, tables, no error."""
    for mod in ("nbclient", "nbformat", "ipykernel", "matplotlib"):
        pytest.importorskip(mod)
    results = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "rmsnorm",
        "--quick",
        "--out",
        str(results),
        "--xs",
        "1,4",
        "--hidden",
        "64",
        "--reps",
        "2",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (results / "broken.json").write_text("{")  # must be reported and skipped, not fail
    monkeypatch.setenv("BI_JAX_RESULTS", str(results))
    name = "03_benchmarks.ipynb"
    shutil.copy(NOTEBOOK_DIR / name, tmp_path / name)
    nb = execute(tmp_path / name, tmp_path)
    assert not _errors(nb), _errors(nb)
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert "1 sweep result(s)" in text and "ignored: broken.json" in text, text[:2000]
    assert "rmsnorm (quick)" in text and "ratio pallas / xla" in text, text[:2000]
    assert "pallas       [hidden 64" in text and "bitwise invariant" in text, text[:2000]
    assert images >= 3, images  # time chart, bandwidth chart, live sweep


def _write(names: list[str]) -> int:
    import nbformat

    for name in names:
        path = NOTEBOOK_DIR / name
        t0 = time.perf_counter()
        nb = execute(path, NOTEBOOK_DIR)
        nbformat.write(nb, path)
        print(f"{name}: executed and written in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "--write":
        print(__doc__)
        sys.exit(2)
    sys.exit(_write(args[1:] or NOTEBOOKS))
