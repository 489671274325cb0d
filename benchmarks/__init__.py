"""bi_jax benchmarks: one sweep per op family, run with ``python -m benchmarks.run <op>``.

See ``benchmarks/README.md``. Each sweep times XLA's default op, the bi_jax Pallas kernel and the
bi_jax plain-jnp reference over a range of token counts, checks that the bi_jax lines are bitwise
invariant over the sweep, and writes JSON, CSV, a PNG chart and a text summary.
"""
