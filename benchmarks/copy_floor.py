"""How close XLA's simplest memory-bound kernels get to the copy bandwidth at a given traffic size.

    python -m benchmarks.copy_floor [--mb 4.19,16.8,33.6,67.1,117.4,134.2] [--reps 50]

The bandwidth targets of the benchmarks (decode, matmul at small M) are fractions of the copy
bandwidth measured on 1 GiB. A kernel that moves only a few MB cannot reach that rate: launch ramp,
the first DRAM round trips and the tail of the last wave are a fixed cost of every kernel. This
module measures that cost for two XLA kernels that move exactly ``T`` bytes of HBM traffic:

- copy: ``x ^ k`` on ``T / 2`` bytes of uint32 (``timing.copy_bandwidth``: read ``T/2``, write
  ``T/2``);
- read: ``max(x ^ k)`` over ``T`` bytes of uint32 (reads ``T``, writes 4 bytes).

The read is the floor to compare a read-bound kernel with (weights, KV cache). On the H100 the
copy is faster than the read at 4 MB, but its time is not monotone in size: 67 and 134 MB took as
long as 117 and 234 MB would (measured once, not explained).

Each is timed with ``bi_jax.timing.time_fn`` (CUPTI kernel time on a GPU, operands rotated through
HBM) and reported as GB/s and as a fraction of the 1 GiB copy. The default sizes are the KV bytes of
one batch row at context 1k / 4k / 16k / 32k (8 KV heads, D = 128, bf16) and the bf16 weights of
the Llama-3-8B projections 4096x4096 and 14336x4096.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bi_jax import timing


def _read_only(nbytes: int, reps: int) -> timing.Timing:
    n = max(1, nbytes // 4)
    x = jax.random.bits(jax.random.key(1), (n,), jnp.uint32)
    k = jnp.asarray(0x9E3779B9, jnp.uint32)
    return timing.time_fn(lambda x, k: jnp.max(x ^ k), x, k, reps=reps, name="read (max)",
                          bytes_accessed=4 * n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", default="4.19,16.8,33.6,67.1,117.4,134.2",
                   help="traffic sizes in MB (1e6 bytes), comma-separated")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--big-mib", type=int, default=1024,
                   help="size of the reference copy in MiB (1024: the benchmarks' copy bandwidth)")
    args = p.parse_args(argv)
    env = timing.environment()
    big = timing.copy_bandwidth(args.big_mib << 20, reps=args.reps)
    print(f"copy floor; {env.get('device')}, jax {env.get('jax')}, {env.get('date')}, "
          f"commit {env.get('git_commit')}")
    print(f"copy of {args.big_mib} MiB (read + write): {big.gbps:.0f} GB/s\n")
    print("traffic MB   copy us  copy GB/s  of big copy    read us  read GB/s  of big copy")
    for mb in (float(s) for s in args.mb.split(",")):
        nbytes = int(mb * 1e6)
        cp = timing.copy_bandwidth(nbytes // 2, reps=args.reps)
        rd = _read_only(nbytes, args.reps)
        # GB/s to 4 significant digits: a slow host's 0.4 GB/s must not print as 0
        print(f"{mb:10.2f} {cp.median_ms * 1e3:9.1f} {cp.gbps:10.4g} {cp.gbps / big.gbps:13.0%} "
              f"{rd.median_ms * 1e3:9.1f} {rd.gbps:10.4g} {rd.gbps / big.gbps:13.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
