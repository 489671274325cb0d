"""bi_jax.timing: statistics, rotation, warm-up exclusion, CUPTI plumbing, JSON, inputs, env.

These check the logic on the CPU (wall clock, and a fake CUPTI extension behind jax's own
``profiler.measure``), not the speed. ``@pytest.mark.gpu`` tests check the real CUPTI path.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bi_jax import timing

# ------------------------------------------------------------------------------------- statistics


def test_summarize_known_values():
    s = timing.summarize([float(v) for v in range(1, 11)])
    assert s["n"] == 10
    assert s["median_ms"] == pytest.approx(5.5)
    assert s["p10_ms"] == pytest.approx(1.9)  # linear interpolation, as numpy.percentile
    assert s["p90_ms"] == pytest.approx(9.1)
    assert (s["min_ms"], s["max_ms"]) == (1.0, 10.0)
    assert s["mean_ms"] == pytest.approx(5.5)
    assert s["std_ms"] == pytest.approx(np.std(np.arange(1, 11)))


def test_summarize_single_and_bad():
    s = timing.summarize([2.0])
    assert s["median_ms"] == s["p10_ms"] == s["p90_ms"] == s["min_ms"] == 2.0
    with pytest.raises(ValueError, match="non-empty"):
        timing.summarize([])
    with pytest.raises(ValueError, match="finite"):
        timing.summarize([1.0, float("nan")])


def test_timing_properties_and_json_round_trip():
    t = timing.Timing(
        name="op", method="cupti", times_ms=[0.5, 0.25, 1.0, 0.75], copies=4, warmup=2,
        compile_s=1.5, bytes_accessed=10**9, flops=2 * 10**12,
        kernels=[("gemm", 0.4), ("fusion", 0.1)],
    )
    assert t.reps == 4 and t.median_ms == pytest.approx(0.625)
    assert t.min_ms == 0.25 and t.max_ms == 1.0
    assert t.gbps == pytest.approx(1e9 / 0.625e-3 / 1e9)
    assert t.tflops == pytest.approx(2e12 / 0.625e-3 / 1e12)
    d = json.loads(json.dumps(t.to_dict()))
    assert d["median_ms"] == pytest.approx(0.625) and d["p90_ms"] == t.p90_ms
    assert timing.Timing.from_dict(d) == t
    no_bytes = timing.Timing(name="x", method="wall", times_ms=[1.0])
    assert no_bytes.gbps is None and no_bytes.tflops is None
    with pytest.raises(ValueError, match="method"):
        timing.Timing(name="x", method="stopwatch", times_ms=[1.0])


# --------------------------------------------------------------------------------------- rotation


def test_rotation_copies_policy():
    l2 = timing.L2_BYTES
    assert timing.rotation_copies(10, None) == 1
    assert timing.rotation_copies(10, 1) == 1
    assert timing.rotation_copies(10, 0) == 1
    assert timing.rotation_copies(10, 5) == 5
    assert timing.rotation_copies(0, "auto") == 1
    # A 4096x4096 bf16 weight (32 MiB): 1 + ceil(100 MiB / 32 MiB) = 5 copies.
    assert timing.rotation_copies(4096 * 4096 * 2, "auto") == 5
    # Bigger than twice the L2: two copies are enough.
    assert timing.rotation_copies(4 * l2, "auto") == 2
    # Tiny operands: capped.
    assert timing.rotation_copies(1024, "auto") == timing.MAX_COPIES
    # Memory cap: never more than max_bytes in copies, and never fewer than one.
    assert timing.rotation_copies(l2, "auto", max_bytes=2 * l2) == 2
    assert timing.rotation_copies(10 * l2, "auto", max_bytes=l2) == 1
    with pytest.raises(ValueError):
        timing.rotation_copies(10, "sometimes")
    with pytest.raises(ValueError):
        timing.rotation_copies(10, -1)


def test_wall_rotation_cycles_through_distinct_copies_and_excludes_warmup():
    x = jnp.arange(1000, dtype=jnp.float32) + 1.0  # 4000 bytes
    seen = []

    def fn(a):
        seen.append(a.unsafe_buffer_pointer())
        if len(seen) == 1:
            time.sleep(0.3)  # a slow first call (like a compilation) must not be timed
        return a

    t = timing.time_fn(fn, x, reps=9, warmup=1, rotate=3, jit=False, method="wall")
    assert t.method == "wall" and t.copies == 3 and t.reps == 9 and t.compile_s is None
    assert max(t.times_ms) < 200, t.times_ms  # the 300 ms warm-up call is excluded
    assert len(seen) == 10  # 1 warm-up + 9 timed
    timed = seen[1:]
    assert len(set(seen)) == 3  # three distinct buffers
    assert all(a != b for a, b in zip(timed, timed[1:]))  # consecutive calls use different copies
    assert timed[:3] == timed[3:6] == timed[6:9]  # a fixed cycle
    assert seen[0] != timed[0]  # timing starts on the copy after the warm-up's


def test_time_fn_jit_compiles_first_and_inspects_output():
    x = timing.random_array(0, (256, 256), jnp.float32)
    got = []
    t = timing.time_fn(lambda a: jnp.tanh(a) * 2, x, reps=5, method="wall",
                       inspect_output=lambda out: got.append(np.asarray(out)),
                       bytes_accessed=2 * x.nbytes)
    assert t.compile_s is not None and t.compile_s > 0
    assert t.copies == timing.rotation_copies(x.nbytes)
    assert t.reps == 5 and all(v > 0 for v in t.times_ms)
    assert len(got) == 1 and np.allclose(got[0], np.tanh(np.asarray(x)) * 2)
    assert t.gbps is not None and t.gbps > 0


def test_max_seconds_reduces_reps():
    x = jnp.ones(4)

    def slow(a):
        time.sleep(0.02)
        return a

    t = timing.time_fn(slow, x, reps=100, jit=False, method="wall", rotate=None, max_seconds=0.1,
                       min_reps=3)
    assert 3 <= t.reps <= 6


def test_bad_arguments():
    x = jnp.ones(4)
    with pytest.raises(ValueError, match="warmup"):
        timing.time_fn(lambda a: a, x, warmup=0)
    with pytest.raises(ValueError, match="reps"):
        timing.time_fn(lambda a: a, x, reps=0)
    with pytest.raises(ValueError, match="method"):
        timing.time_fn(lambda a: a, x, method="stopwatch")
    if not timing.cupti_available():
        with pytest.raises(RuntimeError, match="cupti"):
            timing.time_fn(lambda a: a, x, method="cupti")


class _FakeCupti:
    """Stands in for jax's Mosaic GPU extension: records (kernel, ms) while 'profiling'."""

    def __init__(self):
        self.active = False
        self.records = []
        self.sessions = 0

    def _cupti_init(self):
        self.active, self.records = True, []
        self.sessions += 1

    def _cupti_get_timings(self, finalize):
        self.active = False
        out, self.records = self.records, []
        return out


def test_cupti_path_with_fake_extension(monkeypatch):
    """The CUPTI code path end to end through jax's profiler.measure, with a fake extension."""
    from jax.experimental.mosaic.gpu import profiler

    ext = _FakeCupti()
    monkeypatch.setattr(profiler, "mosaic_gpu_lib", type("Lib", (), {"_mosaic_gpu_ext": ext}))
    monkeypatch.setattr(timing, "cupti_available", lambda: True)

    calls = []

    def fn(a):
        calls.append((ext.active, a.unsafe_buffer_pointer()))
        if ext.active:
            k = sum(1 for active, _ in calls if active)
            ext.records += [("small_kernel", 0.25), ("big_kernel", 1.0 + 0.01 * k)]
        return a

    x = jnp.arange(1000, dtype=jnp.float32) + 1.0  # 4000 bytes -> 4 copies with a 6000-byte "L2"
    t = timing.time_fn(fn, x, reps=10, jit=False, method="cupti", l2_bytes=6000,
                       max_output_bytes=12000)  # 3 outputs per measure() batch -> 4 batches
    assert t.method == "cupti" and t.copies == 4 and t.reps == 10
    assert ext.sessions == 4
    assert t.times_ms == pytest.approx([1.25 + 0.01 * k for k in range(1, 11)])
    assert [name for name, _ in t.kernels] == ["big_kernel", "small_kernel"]
    assert t.kernels[1][1] == pytest.approx(0.25)
    timed = [ptr for active, ptr in calls if active]
    untimed = [ptr for active, ptr in calls if not active]
    assert len(timed) == 10 and len(untimed) == 1 + 4  # our warm-up + one per measure() batch
    assert len({ptr for _, ptr in calls}) == 4
    all_ptrs = [ptr for _, ptr in calls]
    assert all(a != b for a, b in zip(all_ptrs, all_ptrs[1:]))  # never the same copy twice in a row


def test_cupti_no_kernels_is_an_error(monkeypatch):
    from jax.experimental.mosaic.gpu import profiler

    ext = _FakeCupti()
    monkeypatch.setattr(profiler, "mosaic_gpu_lib", type("Lib", (), {"_mosaic_gpu_ext": ext}))
    monkeypatch.setattr(timing, "cupti_available", lambda: True)
    with pytest.raises(RuntimeError, match="no GPU kernel"):
        timing.time_fn(lambda a: a, jnp.ones(4), reps=2, jit=False, method="cupti")


# ----------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_random_array_never_zero_and_bounded(dtype):
    x = np.asarray(timing.random_array(jax.random.key(3), (512, 1024), dtype, scale=3.0)
                   .astype(jnp.float32))
    assert x.shape == (512, 1024)
    assert not np.any(x == 0)
    assert np.all(np.abs(x) <= 3.0)
    assert 0.4 < np.mean(x > 0) < 0.6 and np.std(x) > 1.0  # spread over (-3, 3)


def test_random_array_prefix_stable():
    k = jax.random.key(7)
    big = timing.random_array(k, (33, 70), jnp.bfloat16)
    small = timing.random_array(k, (5, 70), jnp.bfloat16)
    assert big.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(big[:5]).view(np.uint16),
                                  np.asarray(small).view(np.uint16))
    b4 = timing.random_array(k, (2, 16, 3, 8), jnp.float32, axis=1)
    b1 = timing.random_array(k, (2, 4, 3, 8), jnp.float32, axis=1)
    assert b4.shape == (2, 16, 3, 8)
    np.testing.assert_array_equal(np.asarray(b4[:, :4]), np.asarray(b1))
    assert not np.array_equal(np.asarray(b4[0, 0]), np.asarray(b4[0, 1]))  # rows differ
    assert timing.random_array(1, (), jnp.float32).shape == ()
    with pytest.raises(TypeError):
        timing.random_array(0, (3,), jnp.int32)
    with pytest.raises(ValueError):
        timing.random_array(0, (3,), scale=0.0)


# ---------------------------------------------------------------------------- bandwidth and env


def test_copy_bandwidth_runs():
    bw = timing.copy_bandwidth(4 * 2**20, reps=3, method="wall")
    assert bw.bytes_accessed == 8 * 2**20
    assert bw.gbps is not None and bw.gbps > 0 and bw.reps == 3


def test_environment_is_json():
    env = timing.environment()
    for key in ("device", "platform", "jax", "jaxlib", "python", "date", "git_commit",
                "timing_method"):
        assert key in env
    assert env["jax"] == jax.__version__
    json.dumps(env)


def test_environment_commit_override(monkeypatch):
    monkeypatch.setenv("BI_JAX_COMMIT", "abc123")
    assert timing.environment()["git_commit"] == "abc123"


# ---------------------------------------------------------------------------------------- the GPU


@pytest.mark.gpu
def test_cupti_on_gpu_times_device_work():
    assert timing.cupti_available(), "CUPTI should be available on a CUDA GPU"
    a = timing.random_array(0, (64, 4096), jnp.bfloat16)
    b = timing.random_array(1, (4096, 4096), jnp.bfloat16)
    t = timing.time_fn(lambda a, b: a @ b, a, b, reps=10)
    assert t.method == "cupti" and t.reps == 10 and t.copies >= 2
    assert all(v > 0 for v in t.times_ms) and t.median_ms < 5.0 and t.kernels
    # A tiny kernel: CUPTI kernel time excludes the Python dispatch that the wall clock includes.
    x = timing.random_array(2, (1024,), jnp.float32)
    cupti = timing.time_fn(lambda x: x * 3.0, x, reps=20)
    wall = timing.time_fn(lambda x: x * 3.0, x, reps=20, method="wall")
    assert cupti.median_ms < wall.median_ms


@pytest.mark.gpu
def test_copy_bandwidth_on_gpu():
    bw = timing.copy_bandwidth(512 * 2**20, reps=5)
    assert bw.method == "cupti"
    assert 200 < bw.gbps < 20000, bw.gbps  # an H100/H200 does ~3000-4500 GB/s
