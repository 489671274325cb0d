"""What the attention split size costs prefill and buys decode (the Mosaic kernel on Hopper).

    python -m benchmarks.split_size [--splits 512,1024,16384] [--reps 20]

Decode and prefill give a token the same bits because both cut its keys into splits of one fixed
``AttentionConfig.split_size`` and fold the split partials in order (module docstring of
``bi_jax.attention``). The split size is therefore shared: decode wants small splits (at batch 1
they are its only parallelism beyond the 8 KV heads), prefill wants large ones (each split
boundary costs a fold of the running total, which lives in SMEM). This module times both with
the shipped Mosaic config at several split sizes, beside cuDNN (prefill) and XLA (decode) in the
same run: causal prefill, 32/8 heads, D = 128, bf16, at the sweep points that miss the 0.90
throughput target; decode of one token at batch 1 and 8. Every config gives its own bits (split
sizes are part of the numerics); only the shipped one (512) is tested for invariance.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import jax
import jax.numpy as jnp

import bi_jax
from bi_jax import timing

HQ, HKV, D = 32, 8, 128
PREFILL = ((8, 4096), (4, 16384), (8, 16384), (1, 16384))
DECODE = ((1, 1024), (1, 4096), (8, 1024))


def _ms(fn, *args, reps):
    return timing.time_fn(fn, *args, reps=reps).median_ms


def _cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", default="512,1024,16384", help="split sizes, comma-separated")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    attn = importlib.import_module("bi_jax.attention")  # bi_jax.attention is also the function
    base = attn.attention_config(D, jnp.bfloat16)
    if base.kernel != "mosaic":
        raise SystemExit(f"split_size: needs the Mosaic kernel (a Hopper GPU), got {base}")
    splits = [int(s) for s in args.splits.split(",")]
    configs = {s: dataclasses.replace(base, split_size=s) for s in splits}
    env = timing.environment()
    print(f"split size; {env.get('device')}, jax {env.get('jax')}, {env.get('date')}, "
          f"commit {env.get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}")
    print(f"shipped config: {base}\n")
    print("prefill (causal), time / cuDNN's; cuDNN timed before and after the bi_jax configs")
    print("B  T       cuDNN ms (before, after)  " + "  ".join(f"split {s:>5}" for s in splits))
    for b, t in PREFILL:
        key = jax.random.key(200 + b)
        q, k, v = (timing.random_array(jax.random.fold_in(key, i), (b, t, h, D), jnp.bfloat16,
                                       axis=1) for i, h in ((0, HQ), (1, HKV), (2, HKV)))
        reps = max(3, args.reps // 2) if b * t * t > 2e8 else args.reps
        before = _ms(_cudnn, q, k, v, reps=reps)
        ours = [_ms(lambda q, k, v, c=c: bi_jax.attention(q, k, v, causal=True, config=c),
                    q, k, v, reps=reps) for c in configs.values()]
        after = _ms(_cudnn, q, k, v, reps=reps)
        cu = min(before, after)
        print(f"{b}  {t:<6}  {before:8.4f} {after:8.4f}         "
              + "  ".join(f"{m / cu:11.3f}" for m in ours), flush=True)
    print("\ndecode (one token), time / XLA's")
    print("B  context  XLA us  " + "  ".join(f"split {s:>5}" for s in splits))
    for b, s_ctx in DECODE:
        key = jax.random.key(300 + s_ctx)
        q = timing.random_array(jax.random.fold_in(key, 0), (b, 1, HQ, D), jnp.bfloat16)
        k, v = (timing.random_array(jax.random.fold_in(key, i), (b, s_ctx, HKV, D), jnp.bfloat16)
                for i in (1, 2))
        lens = jnp.full((b,), s_ctx, jnp.int32)
        xla = _ms(lambda q, k, v, n: bi_jax.decode_attention(q, k, v, n, implementation="xla"),
                  q, k, v, lens, reps=2 * args.reps)
        ours = [_ms(lambda q, k, v, n, c=c: bi_jax.decode_attention(q, k, v, n, config=c),
                    q, k, v, lens, reps=2 * args.reps) for c in configs.values()]
        print(f"{b}  {s_ctx:<7}  {xla * 1e3:6.2f}  " + "  ".join(f"{m / xla:11.3f}" for m in ours),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
