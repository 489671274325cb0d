"""``python -m bi_jax`` (the needle experiment) runs end to end with tiny settings."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("flax.nnx")
from bi_jax import __main__ as demo  # noqa: E402
from bi_jax import llama  # noqa: E402


def _summary_row(out: str, backend: str) -> tuple[int, int, str, int, int]:
    """(runs, distinct completions, first divergent token, differing steps, total steps)."""
    m = re.search(rf"^  {re.escape(backend)}\s+(\d+)\s+(\d+)\s+(none|token \d+)\s+(\d+) of (\d+)$",
                  out, re.M)
    assert m, f"no summary row for {backend!r} in:\n{out}"
    return int(m[1]), int(m[2]), m[3], int(m[4]), int(m[5])


def test_main_tiny(capsys):
    rc = demo.main(["--size", "tiny", "--dtype", "float32", "--steps", "3", "--batch-sizes",
                    "1,2", "--seed", "5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    runs, distinct, first, diff, total = _summary_row(out, "bi_jax (reference)")
    assert (runs, distinct, first, diff, total) == (4, 1, "none", 0, 9)
    runs, distinct, first, diff, total = _summary_row(out, "XLA default")
    assert runs == 4 and total == 9 and 1 <= distinct <= 4  # reported, not asserted
    assert "bitwise identical in all 9 decode steps" in out
    assert "B=2" in out and "chunk" in out and "reference (needle alone)" in out


def test_main_with_weights_backend_only(tmp_path, capsys):
    model = llama.Llama(llama.LlamaConfig.tiny(vocab_size=300), seed=11)
    llama.save_hf_checkpoint(model, tmp_path)
    rc = demo.main(["--weights", str(tmp_path), "--backend-only", "xla", "--steps", "2",
                    "--batch-sizes", "2", "--size", "tiny", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"weights from {tmp_path}" in out and "vocab 300" in out
    assert "bi_jax (" not in out
    runs, *_ = _summary_row(out, "XLA default")
    assert runs == 3  # the needle alone, then B=2 whole and chunked


def test_plans_put_the_needle_among_others():
    import numpy as np

    plans = demo.make_plans([1, 4], vocab=100, prompt_lengths=(3, 9), steps=5, chunks=(2, 7),
                            rng=np.random.default_rng(0))
    assert [(p.batch, p.mode) for p in plans] == [(1, "whole"), (1, "chunked"), (4, "whole"),
                                                  (4, "chunked")]
    assert plans[0].others == () and plans[1].others == ()
    for p in plans[2:]:
        assert len(p.others) > p.batch - 1  # more requests than slots: some wait in the queue
        assert 0 <= p.needle_index <= len(p.others)
        assert all(3 <= len(prompt) <= 9 and 1 <= n <= 10 for prompt, n in p.others)
    assert plans[3].chunk in (2, 7) and plans[2].chunk is None
