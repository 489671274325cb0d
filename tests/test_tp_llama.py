"""bi_jax.tp_llama: the Llama model tensor-parallel over 1, 2 and 4 (simulated CPU) devices.

Runs itself as a worker in a subprocess with ``--xla_force_host_platform_device_count=4`` (the rest of
the suite has initialised jax with one device), as tests/test_parallel.py: the worker prints
``PASS <name>`` or ``FAIL <name>: <error>`` per check and each pytest test asserts on its own line.
"""

from __future__ import annotations

import sys

import jax
import multidevice
import numpy as np
import pytest

pytest.importorskip("flax")

NUM_DEVICES = 4

# assert_batch_invariant options: every new batch size is a fresh compile, so few of them
INV = dict(sizes=(1,), num_permutations=1, num_embeddings=1)

# ------------------------------------------------------------------------------ the worker (4 devices)

_MODELS = {}


def _model(impl, **kw):
    """A float32 tiny Llama (8 query / 4 KV heads of dim 16: GQA on 2 and 4 devices), cached."""
    from flax import nnx

    from bi_jax import llama

    key = (impl, tuple(sorted(kw.items())))
    if key not in _MODELS:
        cfg = llama.LlamaConfig.tiny(**({"num_heads": 8, "num_kv_heads": 4, "head_dim": 16} | kw))
        model = llama.Llama(cfg, implementation=impl, rngs=nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, cfg.vocab_size)
        one = np.asarray(llama.Runner(model).forward(tokens))  # the jitted one-device forward
        _MODELS[key] = (model, tokens, one)
    return _MODELS[key]


def _check_close(impl, d, **kw):
    """Same weights, same math: within fp32 rounding of the one-device model (not bitwise: the
    o_proj/down_proj K sums are split over the devices)."""
    from bi_jax import parallel, testing, tp_llama

    model, tokens, one = _model(impl, **kw)
    y = tp_llama.tp_forward(model, tokens, parallel.make_mesh(d))
    assert y.dtype == np.float32 and y.shape == one.shape, (y.dtype, y.shape)
    testing.assert_close(y, one.astype(np.float64), dtype=np.float32)


def _check_one_device_bitwise(impl):
    """D = 1: the combine of one partial is the partial, so the bits are the one-device model's."""
    from bi_jax import parallel, testing, tp_llama

    model, tokens, one = _model(impl)
    testing.assert_bitwise_equal(tp_llama.tp_forward(model, tokens, parallel.make_mesh(1)), one)


def _check_invariant(impl, d):
    from bi_jax import parallel, testing, tp_llama

    model, tokens, _ = _model(impl)
    mesh = parallel.make_mesh(d)
    # integer tokens: the neighbours of a row are other rows of the batch
    testing.assert_batch_invariant(lambda t: tp_llama.tp_forward(model, t, mesh), tokens, **INV)


def _check_errors():
    from flax import nnx

    from bi_jax import llama, parallel, tp_llama

    model = llama.Llama(llama.LlamaConfig.tiny(), implementation="reference", rngs=nnx.Rngs(0))
    tokens = np.zeros((1, 4), np.int32)
    for d, what in ((4, "num_kv_heads"), (3, "num_kv_heads")):  # tiny has 2 KV heads
        try:
            tp_llama.tp_forward(model, tokens, parallel.make_mesh(d))
        except ValueError as e:
            assert what in str(e), str(e)
        else:
            raise AssertionError(f"no ValueError for {d} devices and 2 KV heads")
    try:
        tp_llama.tp_forward(model, tokens, parallel.make_mesh(2), axis="tp")
    except ValueError as e:
        assert "no axis" in str(e), str(e)
    else:
        raise AssertionError("no ValueError for a missing mesh axis")


CHECKS = {
    "device_count": lambda: None,
    "one_device_bitwise_reference": lambda: _check_one_device_bitwise("reference"),
    "close_d2_reference": lambda: _check_close("reference", 2),
    "close_d4_reference": lambda: _check_close("reference", 4),
    "close_d2_tied_reference": lambda: _check_close("reference", 2, tie_word_embeddings=True),
    "invariant_d2_reference": lambda: _check_invariant("reference", 2),
    "invariant_d4_reference": lambda: _check_invariant("reference", 4),
    "close_d4_pallas": lambda: _check_close("pallas", 4),
    "invariant_d4_pallas": lambda: _check_invariant("pallas", 4),
    "errors": _check_errors,
}


# ------------------------------------------------------------------------------------ pytest side

worker_output, test_tp_llama, test_worker_exit_code = multidevice.make_tests(CHECKS, NUM_DEVICES, __file__)


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    sys.exit(multidevice.run_checks(CHECKS, NUM_DEVICES))


# ------------------------------------------------------------------------- on two or more GPUs


@pytest.mark.gpu
def test_gpu_tp_llama_invariant_and_close():
    """On every GPU of the machine (>= 2): bf16 small model, Pallas kernels; row bits are the same
    for batch 1..16 and any position, and the logits agree with the one-device model."""
    if jax.device_count() < 2:
        pytest.skip("needs >= 2 GPUs")
    from flax import nnx

    from bi_jax import llama, parallel, testing, tp_llama

    d = 2 if jax.device_count() < 4 else 4
    cfg = llama.LlamaConfig.small(num_heads=8, num_kv_heads=4, dtype="bfloat16")
    model = llama.Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng()
    tokens = jax.numpy.asarray(rng.integers(0, cfg.vocab_size, (16, 64)), jax.numpy.int32)
    mesh = parallel.make_mesh(d)
    testing.assert_batch_invariant(lambda t: tp_llama.tp_forward(model, t, mesh), tokens,
                                   sizes=(1, 3, 7), num_permutations=1, num_embeddings=2)
    one = np.asarray(llama.Runner(model).forward(tokens), np.float64)
    testing.assert_close(tp_llama.tp_forward(model, tokens, mesh), one, dtype=jax.numpy.bfloat16)
