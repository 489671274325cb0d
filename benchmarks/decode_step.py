"""Decode-step latency of the Llama-style model: bi_jax kernels vs XLA's default ops.

    python -m benchmarks.decode_step [--size 1b] [--batches 1,8,64] [--context 512]

Random bf16 weights (fixed seed). Each batch row gets its own random prompt of ``--context`` tokens
(row 0 is the same "needle" prompt in every batch), prefilled in one step; then one decode step is
timed with ``bi_jax.timing.time_fn`` (CUPTI kernel time on a GPU). The needle's decode-step logits
are compared bitwise across batch sizes for each backend (reported, bi_jax expected identical).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bi_jax import llama, timing
from bi_jax import nn as bnn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "small", "1b"], default="1b")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    cfg = {"tiny": llama.LlamaConfig.tiny, "small": llama.LlamaConfig.small,
           "1b": llama.LlamaConfig.llama_1b}[args.size]()
    env = timing.environment()
    print(f"decode step, {args.size} ({cfg.num_params() / 1e6:.0f}M params, {cfg.dtype}), context "
          f"{args.context}; {env.get('device')}, jax {env.get('jax')}, {env.get('date')}")
    model = llama.Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    needle = rng.integers(0, cfg.vocab_size, args.context)
    rows: dict[str, dict[int, tuple[float, np.ndarray]]] = {}
    for label, impl in (("bi_jax", None), ("xla", "xla")):
        bnn.set_implementation(model, impl)
        graphdef, state = nnx.split(model)

        def prefill(state, tokens, caches, graphdef=graphdef):
            return nnx.merge(graphdef, state).step(tokens, caches)

        def decode(state, tokens, caches, graphdef=graphdef):
            return nnx.merge(graphdef, state).step(tokens, caches)[0]

        prefill_j, decode_j = jax.jit(prefill), jax.jit(decode)
        rows[label] = {}
        for b in batches:
            prompts = rng.integers(0, cfg.vocab_size, (b, args.context))
            prompts[0] = needle
            caches = model.init_cache(b, args.context + 8)
            logits, caches = prefill_j(state, jnp.asarray(prompts, jnp.int32), caches)
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
            out = np.asarray(decode_j(state, nxt, caches))
            t = timing.time_fn(decode_j, state, nxt, caches, reps=args.reps, rotate=None, jit=False)
            rows[label][b] = (t.median_ms, out[0])
            print(f"  {label:6s} B={b:3d}: {t.median_ms:8.3f} ms per decode step "
                  f"(p10 {t.p10_ms:.3f}, p90 {t.p90_ms:.3f})", flush=True)
    print("\nB     bi_jax ms   xla ms   bi_jax/xla")
    for b in batches:
        bj, xl = rows["bi_jax"][b][0], rows["xla"][b][0]
        print(f"{b:<5d} {bj:9.3f} {xl:8.3f}   {bj / xl:6.2f}")
    status = 0
    for label in rows:
        ref = rows[label][batches[0]][1]
        same = [b for b in batches if np.array_equal(rows[label][b][1].view(np.uint32),
                                                       ref.view(np.uint32))]
        diff = [b for b in batches if b not in same]
        print(f"{label}: needle decode-step logits bitwise equal to B={batches[0]} at B={same}"
              + (f", differ at B={diff}" if diff else ""))
        if label == "bi_jax" and diff:
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
