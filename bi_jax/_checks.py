"""Input validation shared by every op: raised at trace time, naming the offending shapes/dtypes."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def check_float(op: str, name: str, x: Any) -> None:
    """TypeError unless ``x`` is a bf16/fp16/fp32 array."""
    dtype = jnp.dtype(x.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {dtype} (shape {tuple(x.shape)}); supported dtypes are "
            "bfloat16, float16 and float32"
        )


def check_out_dtype(op: str, dtype: Any) -> jnp.dtype:
    """Normalise an output dtype argument; TypeError for non-float dtypes."""
    d = jnp.dtype(dtype)
    if d not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: output dtype {d} is not supported; use bfloat16, float16 or float32"
        )
    return d


def check_shape(op: str, name: str, x: Any, expected: tuple[int, ...], context: str) -> None:
    """ValueError unless ``x.shape == expected``; ``context`` names the shape it must match."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{op}: {name} has shape {tuple(x.shape)} but must have shape {tuple(expected)} "
            f"({context})"
        )


def normalize_axis(op: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{op}: axis {axis} is out of range for an array of rank {ndim}")
    return axis % ndim

