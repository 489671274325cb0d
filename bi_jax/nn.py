"""Flax NNX layers on bi_jax's batch-invariant ops (needs the ``flax`` extra).

Each layer is a subclass of the ``flax.nnx`` module it replaces, with the same constructor, the same
parameter names, shapes, dtypes and initialisers, and the same epsilon/dtype semantics, plus one
keyword ``implementation=`` (None | "pallas" | "reference" | "xla", as every bi_jax op). Swapping is
a one-line change and checkpoints move between the two unchanged::

    nnx.Linear(256, 512, rngs=rngs)        ->  bi_jax.nn.Linear(256, 512, rngs=rngs)
    nnx.Einsum("bd,df->bf", (256, 512), rngs=rngs)  ->  bi_jax.nn.Einsum(...)
    nnx.Embed(vocab, 256, rngs=rngs)       ->  bi_jax.nn.Embed(...)        (``attend`` via matmul)
    nnx.RMSNorm(256, rngs=rngs)            ->  bi_jax.nn.RMSNorm(...)      (+ ``residual=`` fused form)
    nnx.LayerNorm(256, rngs=rngs)          ->  bi_jax.nn.LayerNorm(...)
    nnx.MultiHeadAttention(..., rngs=rngs) ->  bi_jax.nn.MultiHeadAttention(...)
    nnx.MultiHeadAttention(..., attention_fn=bi_jax.nn.dot_product_attention)

To keep flax's own modules instead, pass bi_jax's ops to them:
``nnx.Linear(..., dot_general=bi_jax.dot_general)``, ``nnx.Einsum(..., einsum_op=bi_jax.nn.einsum)``
and ``nnx.MultiHeadAttention(..., attention_fn=bi_jax.nn.dot_product_attention)``. (flax's Linear
adds its bias after the product is rounded; ``bi_jax.nn.Linear`` adds it in fp32 before the single
rounding. Both are batch-invariant.)

Serving-style decoding uses ``KVCache`` and ``cached_attention`` (on ``bi_jax.decode_attention``):
each row of the batch keeps its own fill level, and one call may carry a prefill chunk for some rows
and a single decode token for others (``q_lengths``).

``set_implementation(model, "xla")`` switches every bi_jax layer of a model in place, so the same
weights run through XLA's default ops for comparison.

Invariance: every layer computes output row ``i`` from input row ``i`` only, through bi_jax's
matmul/dot_general, rms_norm, layer_norm, attention and decode_attention (see their docstrings); the
remaining work is elementwise or a gather. ``implementation="xla"`` promises nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from jax import lax

from bi_jax import _backend as be
from bi_jax.attention import HEAD_DIMS as _FLASH_HEAD_DIMS
from bi_jax.attention import attention as _attention
from bi_jax.attention import decode_attention as _decode_attention
from bi_jax.matmul import dot_general as _dot_general
from bi_jax.matmul import matmul as _matmul
from bi_jax.norm import layer_norm as _layer_norm
from bi_jax.norm import rms_norm as _rms_norm
from bi_jax.reductions import softmax as _softmax

__all__ = [
    "Einsum",
    "Embed",
    "KVCache",
    "LayerNorm",
    "Linear",
    "MultiHeadAttention",
    "RMSNorm",
    "cached_attention",
    "dot_general_fn",
    "dot_product_attention",
    "einsum",
    "set_implementation",
]


def _check_implementation(implementation: str | None, op: str) -> str | None:
    """Validate early (at construction); keep None unresolved so it follows the backend per call."""
    be.resolve_implementation(implementation, op)
    return implementation


def _reshard(y: jax.Array, out_sharding: Any) -> jax.Array:
    return y if out_sharding is None else jax.sharding.reshard(y, out_sharding)


@functools.cache
def dot_general_fn(implementation: str | None = None) -> Callable[..., jax.Array]:
    """``bi_jax.dot_general`` bound to one implementation (a stable object, so jit caches hit)."""
    _check_implementation(implementation, "dot_general_fn")
    return functools.partial(_dot_general, implementation=implementation)


def einsum(
    subscripts: str,
    *operands: jax.Array,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    implementation: str | None = None,
) -> jax.Array:
    """``jnp.einsum`` whose contractions run on ``bi_jax.dot_general`` (the ``einsum_op`` of
    ``nnx.Einsum``).

    Invariance: every pairwise contraction is a bi_jax ``dot_general``. A label summed within a single
    operand (``"ij->i"``) is a plain ``jnp`` reduction and is not covered; linear layers never have one.
    """
    return jnp.einsum(
        subscripts,
        *operands,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
        _dot_general=dot_general_fn(implementation),
    )


# ------------------------------------------------------------------------------------ linear layers


class Linear(nnx.Linear):
    """``nnx.Linear`` on ``bi_jax.matmul`` (parameters ``kernel [in, out]`` and ``bias [out]``).

    The bias is added in fp32 inside the matmul, before the single rounding to the output dtype
    (``preferred_element_type`` if given, else the promoted dtype of inputs and parameters).
    ``dot_general`` is not accepted: the product is always bi_jax's.
    """

    def __init__(self, in_features: int, out_features: int, *, implementation: str | None = None,
                 **kwargs: Any):
        if "dot_general" in kwargs:
            raise TypeError("bi_jax.nn.Linear: dot_general= is not accepted (it is bi_jax's); use "
                            "nnx.Linear(dot_general=bi_jax.dot_general) to keep flax's module")
        super().__init__(in_features, out_features, dot_general=dot_general_fn(implementation),
                         **kwargs)
        self.implementation = _check_implementation(implementation, "Linear")

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = _matmul(
            inputs,
            kernel,
            bias=bias,
            precision=self.precision,
            out_dtype=self.preferred_element_type,
            implementation=self.implementation,
        )
        return _reshard(y, out_sharding)


class Einsum(nnx.Einsum):
    """``nnx.Einsum`` whose contraction runs on ``bi_jax.dot_general`` (parameters ``kernel``,
    ``bias``); the bias is added after the contraction, as in flax."""

    def __init__(self, einsum_str: str, kernel_shape: Any, bias_shape: Any = None, *,
                 implementation: str | None = None, **kwargs: Any):
        if "einsum_op" in kwargs:
            raise TypeError("bi_jax.nn.Einsum: einsum_op= is not accepted (it is bi_jax's)")
        _check_implementation(implementation, "Einsum")
        super().__init__(einsum_str, kernel_shape, bias_shape,
                         einsum_op=functools.partial(einsum, implementation=implementation),
                         **kwargs)
        self.implementation = implementation

    def _bi_jax_set_implementation(self, implementation: str | None) -> None:
        self.implementation = implementation
        self.einsum_op = functools.partial(einsum, implementation=implementation)


class Embed(nnx.Embed):
    """``nnx.Embed`` (parameter ``embedding [num_embeddings, features]``); the lookup is a gather
    (exact), and ``attend`` (tied output logits) runs on ``bi_jax.dot_general``."""

    def __init__(self, num_embeddings: int, features: int, *, implementation: str | None = None,
                 **kwargs: Any):
        super().__init__(num_embeddings, features, **kwargs)
        self.implementation = _check_implementation(implementation, "Embed")

    def attend(self, query: jax.Array, out_sharding: Any = None,
               preferred_element_type: Any = None) -> jax.Array:
        query, embedding = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
        y = _dot_general(
            query,
            embedding,
            (((query.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=preferred_element_type,
            implementation=self.implementation,
        )
        return _reshard(y, out_sharding)


# ------------------------------------------------------------------------------------ normalization


def _check_norm_axes(module: Any, name: str) -> None:
    for attr in ("reduction_axes", "feature_axes"):
        axes = getattr(module, attr)
        if axes not in (-1, (-1,), [-1]):
            raise NotImplementedError(
                f"bi_jax.nn.{name}: {attr}={axes!r} is not supported (only the last axis)"
            )
    if module.axis_name is not None:
        raise NotImplementedError(f"bi_jax.nn.{name}: axis_name= (cross-device stats) is not "
                                  "supported")


class RMSNorm(nnx.RMSNorm):
    """``nnx.RMSNorm`` on ``bi_jax.rms_norm``: ``x * rsqrt(mean(x**2) + epsilon) * scale`` with fp32
    statistics (parameter ``scale [num_features]``, default epsilon 1e-6 as flax).

    ``__call__(x, residual=r)`` is the fused pre-norm form of a residual block: it returns
    ``(rms_norm(x + r), x + r)``, the sum computed once. Only the last axis is normalised;
    ``use_fast_variance`` has no effect (there is no mean to subtract).
    """

    def __init__(self, num_features: int, *, implementation: str | None = None, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        _check_norm_axes(self, "RMSNorm")
        self.implementation = _check_implementation(implementation, "RMSNorm")

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
                 residual: jax.Array | None = None) -> Any:
        if mask is not None:
            raise NotImplementedError("bi_jax.nn.RMSNorm: mask= is not supported")
        scale = self.scale[...] if self.scale is not None else None
        x, scale, residual = self.promote_dtype((x, scale, residual), dtype=self.dtype)
        return _rms_norm(x, scale, eps=self.epsilon, residual=residual,
                               implementation=self.implementation)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` on ``bi_jax.layer_norm``: ``(x - mean) * rsqrt(var + epsilon) * scale + bias``
    with fp32 statistics (parameters ``scale`` and ``bias [num_features]``, default epsilon 1e-6 as
    flax). Only the last axis is normalised; the variance is bi_jax's (``use_fast_variance`` has no
    effect)."""

    def __init__(self, num_features: int, *, implementation: str | None = None, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        _check_norm_axes(self, "LayerNorm")
        self.implementation = _check_implementation(implementation, "LayerNorm")

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:
            raise NotImplementedError("bi_jax.nn.LayerNorm: mask= is not supported")
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
        return _layer_norm(x, scale, bias, eps=self.epsilon,
                                 implementation=self.implementation)


# ---------------------------------------------------------------------------------------- attention


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: nnx.Module | None = None,
    promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
    is_causal: bool = False,
    *,
    implementation: str | None = None,
) -> jax.Array:
    """Drop-in for ``nnx.dot_product_attention`` (the ``attention_fn`` of ``nnx.MultiHeadAttention``).

    Shapes: query ``[batch..., Tq, Hq, D]``, key/value ``[batch..., Tk, Hkv, D]`` with ``Hq % Hkv ==
    0``; ``mask``/``bias`` broadcastable to ``[batch..., Hq, Tq, Tk]``. Returns ``[batch..., Tq, Hq,
    D]``. ``is_causal`` aligns query 0 with key 0 (as flax and ``jax.nn.dot_product_attention``).

    Paths:
      * no mask, no bias, no ``module`` and a head dim ``bi_jax.attention`` supports (a power of
        two from 16 to 256): ``bi_jax.attention`` (flash-style, batch- and
        sequence-slicing-invariant).
      * otherwise (a ``mask``, a ``bias``, ``module`` to sow the weights, another head dim): dense
        scores through ``bi_jax.dot_general`` in fp32, masked/biased as flax does (masked scores
        get the fp32 minimum), ``bi_jax.softmax`` over the keys and the weighted sum of the values
        through ``bi_jax.dot_general``. Batch-invariant; O(Tq * Tk) memory. This is the path of
        ``nnx.MultiHeadAttention(decode=True)``.
      * ``implementation="xla"``: flax's own ``nnx.dot_product_attention``.

    Dropout (``dropout_rate > 0`` and not ``deterministic``) is not supported.
    """
    if implementation == "xla":
        return nnx.dot_product_attention(
            query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
            deterministic, dtype, precision, module, promote_dtype, is_causal,
        )
    be.resolve_implementation(implementation, "dot_product_attention")
    if dropout_rate > 0.0 and not deterministic:
        raise NotImplementedError("bi_jax.nn.dot_product_attention: attention dropout is not "
                                  "supported (pass deterministic=True or dropout_rate=0)")
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            "bi_jax.nn.dot_product_attention: expected query [batch..., Tq, Hq, D] and key/value "
            f"[batch..., Tk, Hkv, D], got {query.shape}, {key.shape}, {value.shape}"
        )
    batch = query.shape[:-3]
    if key.shape[:-3] != batch or value.shape[:-3] != batch or key.shape[-3:] != value.shape[-3:]:
        raise ValueError(
            "bi_jax.nn.dot_product_attention: batch dims or key/value shapes differ: query "
            f"{query.shape}, key {key.shape}, value {value.shape}"
        )
    (tq, hq, d), (tk, hkv, _) = query.shape[-3:], key.shape[-3:]
    if hq % hkv:
        raise ValueError(f"bi_jax.nn.dot_product_attention: query heads ({hq}) must be a multiple "
                         f"of key/value heads ({hkv})")
    nb = math.prod(batch)
    q, k, v = (x.reshape(nb, *x.shape[-3:]) for x in (query, key, value))

    if mask is None and bias is None and module is None and d in _FLASH_HEAD_DIMS:
        # flax's causal mask is top-left aligned (query i sees keys <= i): q_offset = 0.
        offset = jnp.zeros((nb,), jnp.int32) if is_causal else None
        out = _attention(q, k, v, causal=is_causal, q_offset=offset,
                         implementation=implementation)
        return out.reshape(query.shape)

    g = hq // hkv
    dg = dot_general_fn(implementation)
    hi = lax.Precision.HIGHEST
    q5 = q.reshape(nb, tq, hkv, g, d).astype(jnp.float32)
    # scores [nb, Hkv, Tq, G, Tk] -> [nb, Hq, Tq, Tk]
    s = dg(q5, k.astype(jnp.float32), (((4,), (3,)), ((0, 2), (0, 2))), precision=hi)
    s = s.transpose(0, 1, 3, 2, 4).reshape(nb, hq, tq, tk) * jnp.float32(d**-0.5)
    full = (*batch, hq, tq, tk)
    if bias is not None:
        s = s + jnp.broadcast_to(bias, full).reshape(nb, hq, tq, tk).astype(jnp.float32)
    keep = jnp.ones((nb, hq, tq, tk), bool)
    if mask is not None:
        keep = jnp.broadcast_to(mask, full).reshape(nb, hq, tq, tk).astype(bool)
    if is_causal:
        keep = keep & jnp.tril(jnp.ones((tq, tk), bool))
    s = jnp.where(keep, s, jnp.finfo(jnp.float32).min)
    p = _softmax(s, axis=-1, implementation=implementation)  # [nb, Hq, Tq, Tk], fp32
    if module is not None:
        module.sow(nnx.Intermediate, "attention_weights",
                   p.reshape(*batch, hq, tq, tk).astype(query.dtype))
    p5 = p.reshape(nb, hkv, g, tq, tk)
    # [nb, Hkv, G, Tq, D] <- contract the keys
    o = dg(p5, v.astype(jnp.float32), (((4,), (1,)), ((0, 1), (0, 2))), precision=hi)
    o = o.transpose(0, 3, 1, 2, 4).reshape(*batch, tq, hq, d)
    return o.astype(query.dtype)


class MultiHeadAttention(nnx.MultiHeadAttention):
    """``nnx.MultiHeadAttention`` with bi_jax projections (``qkv_dot_general``/``out_dot_general``)
    and ``bi_jax.nn.dot_product_attention`` as ``attention_fn``; same parameters as flax's."""

    def __init__(self, *args: Any, implementation: str | None = None, **kwargs: Any):
        _check_implementation(implementation, "MultiHeadAttention")
        kwargs.setdefault("attention_fn", functools.partial(dot_product_attention,
                                                            implementation=implementation))
        kwargs.setdefault("qkv_dot_general", dot_general_fn(implementation))
        kwargs.setdefault("out_dot_general", dot_general_fn(implementation))
        super().__init__(*args, **kwargs)
        self.implementation = implementation

    def _bi_jax_set_implementation(self, implementation: str | None) -> None:
        self.implementation = implementation
        self.attention_fn = functools.partial(dot_product_attention, implementation=implementation)
        for lin in (self.query, self.key, self.value, self.out):
            lin.dot_general = dot_general_fn(implementation)
        self.qkv_dot_general = self.out_dot_general = dot_general_fn(implementation)


# ------------------------------------------------------------------------------------------ KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A per-row KV cache for serving-style decoding (a pytree; pass it through ``jax.jit``).

    ``k``/``v``: ``[B, S, Hkv, D]``; ``lengths``: ``[B]`` int32, the tokens row ``b`` holds (its
    slots ``lengths[b]..S-1`` are free). Rows advance independently: a prefill chunk for one row and a
    single decode token for another go in the same call.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, batch: int, max_length: int, num_kv_heads: int, head_dim: int,
               dtype: Any = jnp.float32) -> KVCache:
        shape = (batch, max_length, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.k.shape[1]

    def positions(self, num_tokens: int) -> jax.Array:
        """Absolute positions ``[B, T]`` of the next ``num_tokens`` tokens of every row."""
        return self.lengths[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]

    def append(self, k_new: jax.Array, v_new: jax.Array,
               q_lengths: jax.Array | None = None) -> KVCache:
        """Write ``k_new``/``v_new`` ``[B, T, Hkv, D]`` after each row's tokens; only the first
        ``q_lengths[b]`` (default T) tokens of row ``b`` are kept. The caller keeps
        ``lengths + q_lengths <= S`` (writes past the end are dropped)."""
        b, t = k_new.shape[:2]
        if k_new.shape != v_new.shape or k_new.shape[0] != self.k.shape[0] or \
                k_new.shape[2:] != self.k.shape[2:]:
            raise ValueError(f"KVCache.append: new keys {k_new.shape} / values {v_new.shape} do "
                             f"not fit the cache {self.k.shape}")
        ql = _q_lengths(q_lengths, b, t)
        pos = self.positions(t)
        pos = jnp.where(jnp.arange(t)[None, :] < ql[:, None], pos, self.max_length)  # drop padding
        rows = jnp.arange(b)[:, None]
        k = self.k.at[rows, pos].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[rows, pos].set(v_new.astype(self.v.dtype), mode="drop")
        return KVCache(k, v, self.lengths + ql)

    def reset(self, rows: jax.Array) -> KVCache:
        """Empty the rows where ``rows`` (``[B]`` bool) is true (a new request takes the slot)."""
        return dataclasses.replace(self, lengths=jnp.where(rows, 0, self.lengths))


def _q_lengths(q_lengths: jax.Array | None, b: int, t: int) -> jax.Array:
    if q_lengths is None:
        return jnp.full((b,), t, jnp.int32)
    q_lengths = jnp.asarray(q_lengths, jnp.int32)
    if q_lengths.shape != (b,):
        raise ValueError(f"q_lengths has shape {q_lengths.shape}; expected ({b},)")
    return q_lengths


def cached_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    cache: KVCache,
    q_lengths: jax.Array | None = None,
    *,
    scale: float | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, KVCache]:
    """Append the new keys/values to ``cache`` and attend over it (``bi_jax.decode_attention``).

    Args:
      q: ``[B, T, Hq, D]`` new queries; token ``j`` of row ``b`` sits at absolute position
        ``cache.lengths[b] + j`` (use ``cache.positions(T)`` for RoPE before calling).
      k_new, v_new: ``[B, T, Hkv, D]`` the new tokens' keys/values.
      cache: the cache before this call.
      q_lengths: ``[B]`` valid new tokens per row (``<= T``; default T); padding tokens of a row give
        unspecified outputs and are not written.

    Returns:
      ``(out [B, T, Hq, D], new cache)``. Invariance: the output of token ``j`` of row ``b`` depends
      only on that row's cache and queries, and not on how the row's prompt was chunked (DESIGN §1).
    """
    b, t = q.shape[:2]
    ql = _q_lengths(q_lengths, b, t)
    cache = cache.append(k_new, v_new, ql)
    out = _decode_attention(q, cache.k, cache.v, cache.lengths, q_lengths=ql, scale=scale,
                                  implementation=implementation)
    return out, cache


# ------------------------------------------------------------------------------------------ helpers


def set_implementation(module: nnx.Module, implementation: str | None) -> nnx.Module:
    """Switch every bi_jax layer under ``module`` (itself included) to ``implementation``, in place.

    Every module with an ``implementation`` attribute (all of ``bi_jax.nn`` and ``bi_jax.llama``) is
    updated, so the same weights run through another path (e.g. ``"xla"`` for comparison). Returns
    ``module``.
    """
    be.resolve_implementation(implementation, "set_implementation")
    nodes = [n for _, n in nnx.iter_graph(module)
             if isinstance(n, nnx.Module) and hasattr(n, "implementation")]
    for node in nodes:
        hook = getattr(node, "_bi_jax_set_implementation", None)
        if hook is not None:
            hook(implementation)
        else:
            node.implementation = implementation
        if isinstance(node, Linear):
            node.dot_general = dot_general_fn(implementation)
    return module
