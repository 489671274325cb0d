"""Tensor-parallel (Megatron-style) full forward of a ``bi_jax.llama.Llama`` over a one-axis mesh.

``tp_forward(model, tokens, mesh)`` runs the weights of an existing ``Llama`` inside one
``jax.shard_map`` over the ``D`` devices of mesh axis ``axis`` (needs the ``flax`` extra):

  * attention: the query heads and the KV heads are split evenly over the devices (device ``i`` holds
    query heads ``[i Hq/D, (i+1) Hq/D)`` and KV heads ``[i Hkv/D, (i+1) Hkv/D)``, which keeps every
    GQA group on one device). q/k/v are column-parallel (each device multiplies by its columns of
    ``q_proj``/``k_proj``/``v_proj``, no communication), RoPE and ``bi_jax.attention`` run on the
    device's heads, and ``o_proj`` is row-parallel: each device computes an fp32 partial over its
    heads' rows, the partials are ``all_gather``-ed and summed in device order
    (``parallel.fixed_order_combine``) and rounded once, as ``parallel.row_parallel_linear``.
  * MLP: the pattern of ``parallel.tensor_parallel_mlp`` (gate/up column-parallel over the
    intermediate size, ``silu(gate) * up`` local, down row-parallel with the fixed-order combine).
  * the embedding lookup, the RMSNorms (with the fused residual adds) and the logits head are
    replicated: every device computes them on the whole hidden state, with the same bits.

Invariance contract: for a fixed device count (and mesh order) a row's logits have the same bits for
every batch size and every position in the batch: each per-device op is a batch-invariant bi_jax op,
the all-gather is a copy and the combine order depends on ``D`` alone. The logits are *not* bitwise
the one-device model's (the o_proj/down_proj K sums are split differently) and differ between device
counts; they agree with it to fp32 rounding.

Requirements: ``num_kv_heads % D == 0`` (hence ``num_heads % D == 0``) and
``intermediate_size % D == 0``; a ``ValueError`` otherwise. Full-sequence causal forward only (no KV
cache).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bi_jax import parallel
from bi_jax.attention import attention
from bi_jax.llama import Llama, LlamaConfig, apply_rope, rope_table
from bi_jax.matmul import dot_general, matmul
from bi_jax.norm import rms_norm

__all__ = ["tp_forward", "tp_weights"]

_LAYER_SPECS = {
    "input_layernorm": P(),
    "q_proj": P(None, "{axis}"),
    "k_proj": P(None, "{axis}"),
    "v_proj": P(None, "{axis}"),
    "o_proj": P("{axis}", None),
    "post_attention_layernorm": P(),
    "gate_proj": P(None, "{axis}"),
    "up_proj": P(None, "{axis}"),
    "down_proj": P("{axis}", None),
}


def _check_model(cfg: LlamaConfig, d: int, axis: str) -> None:
    op = "tp_forward"
    parallel._check_divisible(op, "num_kv_heads", cfg.num_kv_heads, d, axis)
    parallel._check_divisible(op, "num_heads", cfg.num_heads, d, axis)
    parallel._check_divisible(op, "intermediate_size", cfg.intermediate_size, d, axis)


def tp_weights(model: Llama) -> dict[str, Any]:
    """The model's parameters as a pytree of arrays (kernels ``[in, out]``), in ``tp_forward``'s layout.

    ``{"embed": [V, H], "norm": [H], "lm_head": [H, V] or None (tied), "layers": [per layer: dict of
    input_layernorm, q_proj, k_proj, v_proj, o_proj, post_attention_layernorm, gate_proj, up_proj,
    down_proj]]}``.
    """
    layers = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        layers.append({
            "input_layernorm": layer.input_layernorm.scale[...],
            "q_proj": a.q_proj.kernel[...],
            "k_proj": a.k_proj.kernel[...],
            "v_proj": a.v_proj.kernel[...],
            "o_proj": a.o_proj.kernel[...],
            "post_attention_layernorm": layer.post_attention_layernorm.scale[...],
            "gate_proj": m.gate_proj.kernel[...],
            "up_proj": m.up_proj.kernel[...],
            "down_proj": m.down_proj.kernel[...],
        })
    return {
        "embed": model.embed_tokens.embedding[...],
        "norm": model.norm.scale[...],
        "lm_head": None if model.lm_head is None else model.lm_head.kernel[...],
        "layers": layers,
    }


def _weight_specs(weights: dict[str, Any], axis: str) -> dict[str, Any]:
    def spec(p: P) -> P:
        return P(*(axis if s == "{axis}" else s for s in p))

    return {
        "embed": P(),
        "norm": P(),
        "lm_head": None if weights["lm_head"] is None else P(),
        "layers": [{k: spec(_LAYER_SPECS[k]) for k in layer} for layer in weights["layers"]],
    }


def tp_forward(model: Llama, tokens: jax.Array, mesh: Mesh, *, axis: str = "x",
               implementation: str | None = None) -> jax.Array:
    """Tensor-parallel full causal forward: ``tokens [B, T]`` (int) -> fp32 logits ``[B, T, vocab]``.

    The same weights and the same math as ``model(tokens)``, split over the ``D`` devices of mesh
    axis ``axis`` (see the module docstring). ``implementation``: of every bi_jax op inside (default:
    the model's own ``implementation``). The output is replicated over the mesh.

    Raises:
      ValueError: ``num_kv_heads``, ``num_heads`` or ``intermediate_size`` not divisible by ``D``, or
        the mesh has no axis ``axis``.
    """
    cfg = model.config
    d = parallel._axis_size(mesh, axis)
    _check_model(cfg, d, axis)
    impl = model.implementation if implementation is None else implementation
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tp_forward: tokens must be [B, T], got shape {tuple(tokens.shape)}")
    weights = tp_weights(model)
    cos, sin = rope_table(cfg.dim, cfg.rope_theta, cfg.rope_scaling, tokens.shape[1])
    return _tp_forward(cfg, mesh, axis, impl, weights, tokens, jnp.asarray(cos), jnp.asarray(sin))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _tp_forward(cfg: LlamaConfig, mesh: Mesh, axis: str, impl: str | None, weights: dict[str, Any],
                tokens: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    d = int(mesh.shape[axis])
    dt = cfg.jnp_dtype
    hq, hkv, hd, eps = cfg.num_heads // d, cfg.num_kv_heads // d, cfg.dim, cfg.rms_norm_eps
    mm = functools.partial(matmul, implementation=impl)
    norm = functools.partial(rms_norm, eps=eps, implementation=impl)

    def row_parallel(x: jax.Array, w: jax.Array) -> jax.Array:
        # as parallel.row_parallel_linear: fp32 partial, all_gather, fixed-order fp32 sum, one rounding
        partial = mm(x, w, out_dtype=jnp.float32)
        return parallel._finish(parallel._combine(partial, axis, "fixed"), None, dt)

    def local(weights, tokens, cos, sin):
        b, t = tokens.shape
        c = jnp.broadcast_to(cos[None], (b, t, cos.shape[-1]))  # as Llama._rope: the same rows
        s = jnp.broadcast_to(sin[None], (b, t, sin.shape[-1]))
        x = jnp.take(weights["embed"].astype(dt), tokens, axis=0)  # as nnx.Embed: a gather
        residual = None
        for lw in weights["layers"]:
            if residual is None:
                h, residual = norm(x, lw["input_layernorm"]), x
            else:
                h, residual = norm(x, lw["input_layernorm"], residual=residual)
            # attention over this device's heads: column-parallel q/k/v, row-parallel o_proj
            q = apply_rope(mm(h, lw["q_proj"]).reshape(b, t, hq, hd), c, s)
            k = apply_rope(mm(h, lw["k_proj"]).reshape(b, t, hkv, hd), c, s)
            v = mm(h, lw["v_proj"]).reshape(b, t, hkv, hd)
            o = attention(q, k, v, causal=True, implementation=impl)
            a = row_parallel(o.reshape(b, t, hq * hd), lw["o_proj"])
            h, residual = norm(a, lw["post_attention_layernorm"], residual=residual)
            # MLP: as parallel.tensor_parallel_mlp
            g = jax.nn.silu(mm(h, lw["gate_proj"])) * mm(h, lw["up_proj"])
            x = row_parallel(g, lw["down_proj"])
        h, _ = norm(x, weights["norm"], residual=residual)
        if weights["lm_head"] is None:  # tied: as Embed.attend
            return dot_general(h, weights["embed"].astype(dt), (((h.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32, implementation=impl)
        return mm(h, weights["lm_head"], out_dtype=jnp.float32)

    specs = (_weight_specs(weights, axis), P(), P(), P())
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(
        weights, tokens, cos, sin)
