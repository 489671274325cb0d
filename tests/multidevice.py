"""Multi-device checks on the CPU: a test file re-runs itself as a worker process whose jax sees
``num_devices`` simulated CPU devices (``--xla_force_host_platform_device_count`` must be set before
jax starts, and the pytest process has started it already). The worker prints ``PASS name`` or
``FAIL name: detail`` per check; the pytest side turns each line into a test result.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import traceback
from collections.abc import Callable

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_checks(checks: dict[str, Callable[[], None]], num_devices: int) -> int:
    """Worker side: run every check, print its status, return the exit code."""
    import jax

    if jax.device_count() != num_devices:
        print(f"FAIL device_count: {jax.device_count()} devices, expected {num_devices}", flush=True)
        return 1
    failed = 0
    for name, check in checks.items():
        try:
            check()
        except Exception as exc:  # report every check, then fail
            failed += 1
            detail = "".join(traceback.format_exception_only(exc)).strip().replace("\n", " | ")
            print(f"FAIL {name}: {detail}", flush=True)
            traceback.print_exc(file=sys.stderr)
        else:
            print(f"PASS {name}", flush=True)
    return 1 if failed else 0


def worker_results(test_file: str, num_devices: int):
    """Pytest side: run ``python test_file worker`` with simulated devices; parse its report."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("BI_JAX_INTERPRET", None)
    res = subprocess.run(
        [sys.executable, str(pathlib.Path(test_file).resolve()), "worker"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    lines = {}
    for line in res.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL"):
            name, _, detail = rest.partition(":")
            lines[name] = (status, detail.strip())
    return res, lines


def assert_check(worker_output, name: str) -> None:
    res, lines = worker_output
    if name not in lines:
        pytest.fail(f"worker (rc={res.returncode}) reported nothing for {name}; stderr tail:\n"
                    f"{res.stderr[-3000:]}")
    status, detail = lines[name]
    assert status == "PASS", f"{name}: {detail}"


def assert_exit_ok(worker_output) -> None:
    res, _ = worker_output
    assert res.returncode == 0, res.stderr[-3000:]


def make_tests(checks: dict[str, Callable[[], None]], num_devices: int, test_file: str):
    """The pytest side of a multi-device test file: ``(worker_output fixture, per-check test, exit
    code test)``, to assign to module-level names (``test_*``) so pytest collects them."""

    @pytest.fixture(scope="module")
    def worker_output():
        return worker_results(test_file, num_devices)

    @pytest.mark.parametrize("name", list(checks))
    def test_check(worker_output, name):
        assert_check(worker_output, name)

    def test_worker_exit_code(worker_output):
        assert_exit_ok(worker_output)

    return worker_output, test_check, test_worker_exit_code
