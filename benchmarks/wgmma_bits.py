"""Whether other wgmma forms give the bits of the attention kernel's products (Hopper).

    python -m benchmarks.wgmma_bits

Decode at batch 1 spends its time in one compute warpgroup's per-block chain (README,
"What a block of decode at batch 1 costs"), and the wgmma's 64 rows hold only the 4 query heads of
a KV group. Two redesigns would keep the bits only if the tensor cores give the same fp32 result
for the same products in another form. This module measures that on the GPU, one block of the
kernel's shapes (64 rows, 128 keys, D = 128, bf16 in, fp32 accumulate), random inputs:

1. ``s = q k^T`` (as the kernel) against ``s^T = k q^T``: the keys as the wgmma's 64-row M (two
   halves), the first 8 rows of q as its N = 8.
2. ``acc0 + p @ v`` with p from registers (as the kernel) against p read from SMEM (a second
   warpgroup could take p through SMEM and run p @ v while the first scores the next block).
3. ``acc0 + p @ v`` against ``acc0^T + v^T p^T``: D as M (two halves, v transposed in SMEM), the
   first 8 rows as N.

It prints, per comparison, whether the bits are equal and how many elements differ. It stops at
once without a Hopper GPU (the interpreter has no wgmma with a register operand or an initialised
accumulator).
"""

from __future__ import annotations

import argparse
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from bi_jax import _backend as be
from bi_jax import timing

_attention = importlib.import_module("bi_jax.attention")  # bi_jax.attention is also the function

F32, BF16 = jnp.float32, jnp.bfloat16
ROWS, KEYS, D, N8 = 64, 128, 128, 8
IN_SHAPES = (((ROWS, D), BF16), ((KEYS, D), BF16), ((ROWS, KEYS), BF16), ((KEYS, D), BF16),
             ((ROWS, D), F32), ((2, ROWS, N8), F32))  # q, k, p, v, acc0, acc0^T (first 8 rows)
OUT_SHAPES = (((ROWS, KEYS), F32), ((2, ROWS, N8), F32), ((ROWS, D), F32), ((ROWS, D), F32),
              ((2, ROWS, N8), F32))  # s, s^T, p v (p in registers), p v (p in SMEM), (p v)^T


def _body(q_g, k_g, p_g, v_g, a0_g, a0t_g, s_o, st_o, pv_reg_o, pv_smem_o, pvt_o):
    plgpu = be.mgpu
    lay = plgpu.Layout.WGMMA
    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def scoped(q_s, k_s, p_s, v_s, a0_s, a0t_s, wide_s, narrow_s, bar):
        pairs = ((q_g, q_s), (k_g, k_s), (p_g, p_s), (v_g, v_s), (a0_g, a0_s), (a0t_g, a0t_s))
        for i, (g, s) in enumerate(pairs):
            plgpu.copy_gmem_to_smem(g, s, bar.at[i])
        for i in range(len(pairs)):
            plgpu.barrier_wait(bar.at[i])

        product = _attention._mosaic_pv  # acc0 + a @ b in the wgmma accumulator, as the kernel

        def write(x, dst, smem):
            smem[...] = x
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, dst)
            plgpu.wait_smem_to_gmem(0)

        zeros = plgpu.layout_cast(jnp.zeros((ROWS, KEYS), F32), lay)
        write(product(zeros, q_s, k_s.transpose((1, 0))), s_o, wide_s)
        for h in range(2):
            zeros8 = plgpu.layout_cast(jnp.zeros((ROWS, N8), F32), lay)
            keys_h = k_s.at[pl.ds(h * ROWS, ROWS)]
            write(product(zeros8, keys_h, q_s.at[pl.ds(0, N8)].transpose((1, 0))),
                  st_o.at[h], narrow_s)
        acc0 = plgpu.load(a0_s, layout=lay)
        write(product(acc0, plgpu.load(p_s, layout=lay), v_s), pv_reg_o, wide_s)
        write(product(acc0, p_s, v_s), pv_smem_o, wide_s)
        for h in range(2):
            v_t = v_s.at[:, pl.ds(h * ROWS, ROWS)].transpose((1, 0))  # [D half, keys]
            write(product(plgpu.load(a0t_s.at[h], layout=lay), v_t,
                          p_s.at[pl.ds(0, N8)].transpose((1, 0))), pvt_o.at[h], narrow_s)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((ROWS, D), BF16, transforms=tr), plgpu.SMEM((KEYS, D), BF16, transforms=tr),
        plgpu.SMEM((ROWS, KEYS), BF16, transforms=tr), plgpu.SMEM((KEYS, D), BF16, transforms=tr),
        plgpu.SMEM((ROWS, D), F32), plgpu.SMEM((2, ROWS, N8), F32),
        plgpu.SMEM((ROWS, D), F32), plgpu.SMEM((ROWS, N8), F32),
        plgpu.Barrier(num_barriers=len(IN_SHAPES)), collective_axes="wg")


def products(*args):
    """The kernel: ``IN_SHAPES`` arrays -> ``OUT_SHAPES`` arrays (one CTA, one warpgroup)."""
    return be.mosaic_kernel(
        _body, out_type=[jax.ShapeDtypeStruct(s, d) for s, d in OUT_SHAPES], grid=(1,),
        grid_names=("cta",), num_threads=1, thread_name="wg")(*args)


def _differ(a: np.ndarray, b: np.ndarray) -> str:
    n = int((a.view(np.uint32) != b.view(np.uint32)).sum())
    return f"{'equal bits' if n == 0 else 'DIFFERENT'} ({n} of {a.size} elements differ)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not be.is_hopper():
        raise SystemExit("wgmma_bits: needs a Hopper GPU (wgmma), got "
                         f"{jax.devices()[0].device_kind}")
    ks = jax.random.split(jax.random.key(args.seed), 5)
    q = jax.random.normal(ks[0], (ROWS, D), F32).astype(BF16)
    k = jax.random.normal(ks[1], (KEYS, D), F32).astype(BF16)
    p16 = jax.random.uniform(ks[2], (ROWS, KEYS), F32, 0.01, 1.0).astype(BF16)  # softmax-like
    v = jax.random.normal(ks[3], (KEYS, D), F32).astype(BF16)
    acc0 = jax.random.normal(ks[4], (ROWS, D), F32) * 8
    acc0_t = acc0[:N8].T.reshape(2, ROWS, N8)
    s, s_t, pv_reg, pv_smem, pv_t = (np.asarray(x) for x in
                                     jax.jit(products)(q, k, p16, v, acc0, acc0_t))
    s_t = s_t.reshape(KEYS, N8).T  # [8 rows, keys]
    pv_t = pv_t.reshape(D, N8).T  # [8 rows, D]
    exact = np.asarray(q, np.float64) @ np.asarray(k, np.float64).T
    env = timing.environment()
    print(f"wgmma bits; {env.get('device')}, jax {env.get('jax')}, {env.get('date')}, "
          f"commit {env.get('git_commit')}, seed {args.seed}")
    print(f"q k^T against float64: max |error| {np.abs(s - exact).max():.3g}")
    print(f"1. s^T = k q^T (keys as M, N = 8) against q k^T:  {_differ(s_t, s[:N8])}")
    print(f"2. p @ v with p from SMEM against registers:      {_differ(pv_smem, pv_reg)}")
    print(f"3. v^T p^T (D as M, N = 8) against p @ v:         {_differ(pv_t, pv_reg[:N8])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
