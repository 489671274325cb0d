"""A small Llama-style decoder in Flax NNX on bi_jax's layers, a Hugging Face safetensors loader, and
serving-style generation (needs the ``flax`` extra).

The model: token embedding, ``num_layers`` pre-norm blocks (RMSNorm -> grouped-query self-attention
with rotary position embeddings -> residual; RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and
a linear head to fp32 logits. Module and parameter names follow the Hugging Face Llama layout
(``embed_tokens``, ``layers[i].self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``, ``norm``,
``lm_head``), so ``load_hf_checkpoint`` maps a checkpoint one to one (``[out, in]`` weights are
transposed into ``kernel [in, out]``).

Which ops run where: every matmul (q/k/v/o, gate/up/down, the logits head) is ``bi_jax.matmul``, the
norms are ``bi_jax.rms_norm`` with the residual add fused, full-sequence attention is
``bi_jax.attention`` and cached attention is ``bi_jax.decode_attention`` (through
``bi_jax.nn.cached_attention``). RoPE (cos/sin gathered from a table computed once on the host in
float64), SwiGLU, the embedding lookup and the sampling are elementwise or gathers, so they are
batch-invariant as they are. ``implementation=`` (or ``bi_jax.nn.set_implementation(model, "xla")``)
runs the same weights through another path; ``"xla"`` is XLA's default ops everywhere.

Serving (``Runner``, ``Request``, ``serve``, ``generate``): a fixed number of batch slots, each with its
own KV-cache fill level; every step feeds each slot either its next prompt chunk (whole prompt or
``prefill_chunk`` tokens) or its last sampled token, so one batch mixes prefill and decode rows (as a
continuous-batching server does). A slot whose request finished takes the next request from the
queue. Greedy sampling at temperature 0; otherwise the Gumbel-max trick with a key per request and
token index, so the sample depends on the request alone.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bi_jax import _backend as be
from bi_jax import nn as bnn
from bi_jax.attention import attention as _attention

__all__ = [
    "Llama",
    "LlamaConfig",
    "Request",
    "Runner",
    "generate",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
    "serve",
]

# ------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Model hyper-parameters (Hugging Face ``LlamaConfig`` names in ``from_hf``/``to_hf``)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # ("rope_type", "llama3"), ...
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig: num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"LlamaConfig: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}; give head_dim")
        if self.dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.dim} must be even (RoPE)")

    @property
    def dim(self) -> int:
        """The head dimension."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def num_params(self) -> int:
        h, d = self.hidden_size, self.dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * h * self.intermediate_size
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.vocab_size * h + self.num_layers * (attn + mlp + 2 * h) + h + head

    # presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **kw: Any) -> LlamaConfig:
        """2 layers, hidden 64: for tests."""
        base = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                    num_heads=4, num_kv_heads=2)
        return cls(**(base | kw))

    @classmethod
    def small(cls, **kw: Any) -> LlamaConfig:
        """4 layers, hidden 256, 8/2 heads, vocab 4096 (~5M parameters): the CPU demo."""
        return cls(**kw)

    @classmethod
    def llama_1b(cls, **kw: Any) -> LlamaConfig:
        """16 layers, hidden 2048, 32/8 heads, intermediate 8192, vocab 32000 (~1.1B parameters)."""
        base = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=16,
                    num_heads=32, num_kv_heads=8, rope_theta=500000.0, dtype="bfloat16")
        return cls(**(base | kw))

    # Hugging Face config.json ------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, dtype: Any = None) -> LlamaConfig:
        """From a Hugging Face Llama ``config.json`` dict (``dtype`` overrides ``torch_dtype``)."""
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={hf['hidden_act']!r} (only silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise NotImplementedError(f"{flag}=true is not supported")
        scaling = hf.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise NotImplementedError(f"rope_scaling type {kind!r} (only llama3)")
            scaling = None if kind == "default" else tuple(sorted(
                (k, v) for k, v in scaling.items() if k != "type"))
        if dtype is None:
            dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim == hf["hidden_size"] // heads and hf["hidden_size"] % heads == 0:
            head_dim = None  # the default
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            dtype=str(jnp.dtype(dtype)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict for this config."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.dtype,
        }


# --------------------------------------------------------------------------------------------- RoPE


@functools.lru_cache(maxsize=32)
def rope_table(head_dim: int, theta: float, scaling: tuple | None, length: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables ``[length, head_dim // 2]`` (float32, computed in float64 on the host).

    ``scaling``: None or the llama3 parameters (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings) as sorted (key, value) pairs.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is not None:
        p = dict(scaling)
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    angles = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by ``cos``/``sin [B, T, D/2]`` (the rotate-half convention of the
    Hugging Face Llama); fp32 math, rounded back to x's dtype once."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# -------------------------------------------------------------------------------------------- model


def _linear(cfg: LlamaConfig, n_in: int, n_out: int, implementation: str | None,
            rngs: nnx.Rngs, **kw: Any) -> bnn.Linear:
    return bnn.Linear(n_in, n_out, use_bias=False, dtype=cfg.jnp_dtype,
                      param_dtype=cfg.jnp_dtype, implementation=implementation, rngs=rngs, **kw)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE; ``q_proj``/``k_proj``/``v_proj``/``o_proj``."""

    def __init__(self, cfg: LlamaConfig, *, implementation: str | None, rngs: nnx.Rngs):
        d = cfg.dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = _linear(cfg, cfg.hidden_size, cfg.num_heads * d, implementation, rngs)
        self.k_proj = _linear(cfg, cfg.hidden_size, cfg.num_kv_heads * d, implementation, rngs)
        self.v_proj = _linear(cfg, cfg.hidden_size, cfg.num_kv_heads * d, implementation, rngs)
        self.o_proj = _linear(cfg, cfg.num_heads * d, cfg.hidden_size, implementation, rngs)
        self.implementation = implementation

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *,
                 cache: bnn.KVCache | None = None, q_lengths: jax.Array | None = None
                 ) -> tuple[jax.Array, bnn.KVCache | None]:
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if cache is None:
            o = _attention(q, k, v, causal=True, implementation=self.implementation)
        else:
            o, cache = bnn.cached_attention(q, k, v, cache, q_lengths,
                                            implementation=self.implementation)
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim)), cache


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: LlamaConfig, *, implementation: str | None, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, h, i, implementation, rngs)
        self.up_proj = _linear(cfg, h, i, implementation, rngs)
        self.down_proj = _linear(cfg, i, h, implementation, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block. Takes the previous sublayer's output ``x`` and the residual stream (None in
    the first layer) and returns the MLP output and the updated stream: each residual add is fused
    into the following RMSNorm (``bi_jax.rms_norm(x, residual=...)``)."""

    def __init__(self, cfg: LlamaConfig, *, implementation: str | None, rngs: nnx.Rngs):
        norm = functools.partial(bnn.RMSNorm, cfg.hidden_size, epsilon=cfg.rms_norm_eps,
                                 dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype,
                                 implementation=implementation, rngs=rngs)
        self.input_layernorm = norm()
        self.self_attn = LlamaAttention(cfg, implementation=implementation, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = LlamaMLP(cfg, implementation=implementation, rngs=rngs)

    def __call__(self, x, residual, cos, sin, *, cache=None, q_lengths=None):
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual=residual)
        a, cache = self.self_attn(h, cos, sin, cache=cache, q_lengths=q_lengths)
        h, residual = self.post_attention_layernorm(a, residual=residual)
        return self.mlp(h), residual, cache


class Llama(nnx.Module):
    """The decoder. ``Llama(config, seed=0)`` draws fixed-seed random weights (embedding N(0, 1),
    projections flax's default lecun-normal, norm scales 1).

    ``model(tokens)``: full causal forward, logits ``[B, T, vocab]`` in fp32.
    ``model.step(tokens, caches, q_lengths)``: a serving step over KV caches (``init_cache``).
    """

    def __init__(self, config: LlamaConfig, *, implementation: str | None = None,
                 rngs: nnx.Rngs | None = None, seed: int = 0):
        be.resolve_implementation(implementation, "Llama")
        rngs = nnx.Rngs(seed) if rngs is None else rngs
        cfg = self.config = config
        dt = cfg.jnp_dtype
        self.embed_tokens = bnn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt,
                                      embedding_init=nnx.initializers.normal(1.0),
                                      implementation=implementation, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, implementation=implementation, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.norm = bnn.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, dtype=dt,
                                param_dtype=dt, implementation=implementation, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else _linear(
            cfg, cfg.hidden_size, cfg.vocab_size, implementation, rngs,
            preferred_element_type=jnp.float32)
        self.implementation = implementation

    # ------------------------------------------------------------------------------------------
    def _rope(self, positions: jax.Array, table_length: int) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        cos, sin = rope_table(cfg.dim, cfg.rope_theta, cfg.rope_scaling, table_length)
        idx = jnp.clip(positions, 0, table_length - 1)  # padding tokens may point past the end
        return jnp.asarray(cos)[idx], jnp.asarray(sin)[idx]

    def _trunk(self, tokens, cos, sin, caches, q_lengths):
        x, residual = self.embed_tokens(tokens), None
        new_caches = []
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            x, residual, cache = layer(x, residual, cos, sin, cache=cache, q_lengths=q_lengths)
            new_caches.append(cache)
        h, _ = self.norm(x, residual=residual)
        return h, (None if caches is None else tuple(new_caches))

    def logits(self, h: jax.Array) -> jax.Array:
        """fp32 logits ``[..., vocab]`` of final hidden states ``h [..., hidden]``."""
        if self.lm_head is None:
            return self.embed_tokens.attend(h, preferred_element_type=jnp.float32)
        return self.lm_head(h)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Full causal forward of ``tokens [B, T]`` (int) -> logits ``[B, T, vocab]`` (fp32)."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = self._rope(positions, t)
        h, _ = self._trunk(tokens, cos, sin, None, None)
        return self.logits(h)

    def init_cache(self, batch: int, max_length: int) -> tuple[bnn.KVCache, ...]:
        """Empty per-layer KV caches for ``batch`` rows of up to ``max_length`` tokens."""
        cfg = self.config
        return tuple(bnn.KVCache.create(batch, max_length, cfg.num_kv_heads, cfg.dim,
                                        cfg.jnp_dtype) for _ in range(cfg.num_layers))

    def step(self, tokens: jax.Array, caches: Sequence[bnn.KVCache],
             q_lengths: jax.Array | None = None, *, all_logits: bool = False
             ) -> tuple[jax.Array, tuple[bnn.KVCache, ...]]:
        """One serving step.

        Args:
          tokens: ``[B, T]`` new tokens; row ``b`` uses its first ``q_lengths[b]`` (the rest is
            padding). Token ``j`` of row ``b`` sits at position ``caches[0].lengths[b] + j``.
          caches: the per-layer caches (``init_cache``).
          q_lengths: ``[B]`` valid tokens per row, ``1 <= q_lengths[b] <= T`` (default T).
          all_logits: return logits for every token (``[B, T, vocab]``) instead of each row's last
            valid token (``[B, vocab]``).

        Returns:
          ``(logits (fp32), new caches)``.
        """
        b, t = tokens.shape
        ql = bnn._q_lengths(q_lengths, b, t)
        cos, sin = self._rope(caches[0].positions(t), caches[0].max_length)
        h, caches = self._trunk(tokens, cos, sin, tuple(caches), ql)
        if not all_logits:
            h = h[jnp.arange(b), jnp.maximum(ql - 1, 0)]  # gather: exact
        return self.logits(h), caches


# ------------------------------------------------------------------------------ Hugging Face files


def _hf_params(cfg: LlamaConfig) -> list[tuple[str, tuple[Any, ...], bool]]:
    """(Hugging Face tensor name, path of our parameter, transpose?) for every parameter."""
    out: list[tuple[str, tuple[Any, ...], bool]] = [
        ("model.embed_tokens.weight", ("embed_tokens", "embedding"), False)
    ]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"{p}self_attn.{name}.weight", ("layers", i, "self_attn", name, "kernel"),
                        True))
        for name in ("gate_proj", "up_proj", "down_proj"):
            out.append((f"{p}mlp.{name}.weight", ("layers", i, "mlp", name, "kernel"), True))
        for name in ("input_layernorm", "post_attention_layernorm"):
            out.append((f"{p}{name}.weight", ("layers", i, name, "scale"), False))
    out.append(("model.norm.weight", ("norm", "scale"), False))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), True))
    return out


def _variable(model: nnx.Module, path: tuple[Any, ...]) -> nnx.Variable:
    node: Any = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def load_hf_checkpoint(path: str | os.PathLike, *, implementation: str | None = None,
                       dtype: Any = None) -> Llama:
    """Load a local Hugging Face Llama checkpoint directory (``config.json`` + ``*.safetensors``).

    Nothing is downloaded. ``dtype`` overrides the checkpoint's ``torch_dtype``. Raises
    ``FileNotFoundError`` for a missing file, ``KeyError`` for a missing tensor, ``ValueError`` for a
    tensor of the wrong shape or one this model does not use.
    """
    from safetensors.flax import load_file

    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"load_hf_checkpoint: no config.json in {path!r}")
    with open(cfg_file) as f:
        cfg = LlamaConfig.from_hf(json.load(f), dtype=dtype)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"load_hf_checkpoint: no *.safetensors file in {path!r}")
    tensors: dict[str, jax.Array] = {}
    for file in files:
        tensors.update(load_file(file))

    model = nnx.eval_shape(lambda: Llama(cfg, implementation=implementation))
    used = set()
    for name, vpath, transpose in _hf_params(cfg):
        if name not in tensors:
            raise KeyError(f"load_hf_checkpoint: tensor {name!r} is missing from {path!r}")
        w = tensors[name].T if transpose else tensors[name]
        var = _variable(model, vpath)
        if tuple(w.shape) != tuple(var.shape):
            raise ValueError(f"load_hf_checkpoint: {name} has shape {tuple(tensors[name].shape)}; "
                             f"the config needs {tuple(var.shape[::-1] if transpose else var.shape)}")
        var.set_value(jnp.asarray(w, cfg.jnp_dtype))
        used.add(name)
    extra = [n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq")
             and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if extra:
        raise ValueError(f"load_hf_checkpoint: tensors not used by the model: {sorted(extra)[:8]}")
    return model


def save_hf_checkpoint(model: Llama, path: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the Hugging Face Llama layout."""
    from safetensors.flax import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, vpath, transpose in _hf_params(model.config):
        w = _variable(model, vpath)[...]
        tensors[name] = jnp.asarray(w.T if transpose else w)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f, indent=2)


# ---------------------------------------------------------------------------------------- serving


def sample_tokens(logits: jax.Array, seeds: jax.Array, token_index: jax.Array,
                  temperature: jax.Array) -> jax.Array:
    """Next tokens ``[B]`` from logits ``[B, V]``, per row: argmax where ``temperature[b] == 0``,
    else the Gumbel-max trick with the key ``fold_in(key(seeds[b]), token_index[b])``, so a row's
    sample depends on its own request and position only, not on the batch."""

    def one(seed, index, temp, row):
        key = jax.random.fold_in(jax.random.key(seed), index)
        hot = row / jnp.where(temp > 0, temp, 1.0) + jax.random.gumbel(key, row.shape)
        return jnp.where(temp > 0, jnp.argmax(hot), jnp.argmax(row))

    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), seeds.shape)
    return jax.vmap(one)(seeds, token_index, temperature, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _step(graphdef, state, tokens, caches, q_lengths, reset, seeds, token_index, temperature):
    model = nnx.merge(graphdef, state)
    caches = tuple(c.reset(reset) for c in caches)
    logits, caches = model.step(tokens, caches, q_lengths)
    return sample_tokens(logits, seeds, token_index, temperature), logits, caches


class Runner:
    """Jitted entry points of a model, its weights captured when the runner is made (make a new one
    after changing them or ``set_implementation``). Runners of models with the same structure share
    compiled code.

    ``forward(tokens)``: full-sequence logits. ``step(tokens, caches, q_lengths, reset, seeds,
    token_index, temperature)``: empties the rows flagged in ``reset``, runs ``Llama.step`` and
    samples (``sample_tokens``); returns ``(next_tokens [B], logits [B, vocab], caches)``.
    """

    def __init__(self, model: Llama):
        self.model, self.config = model, model.config
        self._graphdef, self._state = nnx.split(model)

    def forward(self, tokens: Any) -> jax.Array:
        return _forward(self._graphdef, self._state, jnp.asarray(tokens, jnp.int32))

    def init_cache(self, batch: int, max_length: int) -> tuple[bnn.KVCache, ...]:
        return self.model.init_cache(batch, max_length)

    def step(self, tokens, caches, q_lengths, reset, seeds, token_index, temperature):
        return _step(self._graphdef, self._state, tokens, caches, q_lengths, reset, seeds,
                     token_index, temperature)


@dataclasses.dataclass
class Request:
    """One generation request; ``serve`` fills ``tokens`` (and ``logits`` when ``record_logits``)."""

    prompt: Sequence[int]
    max_new_tokens: int
    seed: int = 0
    temperature: float = 0.0  # 0: greedy
    record_logits: bool = False
    tokens: list[int] = dataclasses.field(default_factory=list)
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens


def _bucket(n: int, buckets: Sequence[int] | None) -> int:
    """The padded token count of a step: the smallest bucket >= n (default: powers of two), so
    few shapes are compiled."""
    if buckets is not None:
        for b in sorted(buckets):
            if b >= n:
                return b
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def serve(
    runner: Runner,
    requests: Iterable[Request],
    *,
    slots: int,
    max_length: int | None = None,
    prefill_chunk: int | Callable[[Request], int] | None = None,
    until: Callable[[], bool] | None = None,
    on_step: Callable[[], None] | None = None,
    buckets: Sequence[int] | None = None,
) -> list[Request]:
    """Run ``requests`` through ``slots`` batch rows, continuous-batching style.

    Each step feeds every busy slot its next prompt chunk (the whole prompt if ``prefill_chunk`` is
    None, else up to ``prefill_chunk`` tokens; a callable picks the chunk per request) or its last
    sampled token; a slot whose request is done (or empty) takes the next request from the queue, in
    order. Idle slots (queue empty) feed one padding token. Stops when every request is done, or as
    soon as ``until()`` is true. ``buckets``: the allowed padded token counts per step (default
    powers of two; a step needing more than the largest bucket uses the next power of two).
    Returns the requests (their ``tokens``/``logits`` filled).
    """
    requests = list(requests)
    if slots < 1:
        raise ValueError(f"serve: slots={slots} must be >= 1")
    for r in requests:
        if len(r.prompt) < 1 or r.max_new_tokens < 1:
            raise ValueError("serve: every request needs a non-empty prompt and max_new_tokens >= 1")
    need = max(len(r.prompt) + r.max_new_tokens for r in requests)
    max_length = need if max_length is None else max_length
    if need > max_length:
        raise ValueError(f"serve: a request needs {need} cache slots; max_length={max_length}")
    queue = collections.deque(requests)
    active: list[Request | None] = [None] * slots
    fed = [0] * slots
    caches = runner.init_cache(slots, max_length)
    seeds = np.zeros(slots, np.int32)
    temps = np.zeros(slots, np.float32)
    while True:
        reset = np.zeros(slots, bool)
        for s in range(slots):
            if (active[s] is None or active[s].done) and queue:
                active[s], fed[s], reset[s] = queue.popleft(), 0, True
                seeds[s], temps[s] = active[s].seed, active[s].temperature
            elif active[s] is not None and active[s].done:
                active[s] = None
        if all(a is None for a in active) or (until is not None and until()):
            break
        feeds: list[list[int]] = []
        for s, r in enumerate(active):
            if r is None:
                feeds.append([0])
                reset[s] = True  # idle: keep the row empty
            elif fed[s] < len(r.prompt):
                n = len(r.prompt) - fed[s]
                chunk = prefill_chunk(r) if callable(prefill_chunk) else prefill_chunk
                if chunk is not None:
                    n = min(n, chunk)
                feeds.append(list(r.prompt[fed[s]:fed[s] + n]))
            else:
                feeds.append([r.tokens[-1]])
        t = _bucket(max(len(f) for f in feeds), buckets)
        tokens = np.zeros((slots, t), np.int32)
        for s, f in enumerate(feeds):
            tokens[s, :len(f)] = f
        q_lengths = np.array([len(f) for f in feeds], np.int32)
        index = np.array([0 if r is None else len(r.tokens) for r in active], np.int32)
        nxt, logits, caches = runner.step(tokens, caches, q_lengths, reset, seeds, index, temps)
        nxt = np.asarray(nxt)
        for s, r in enumerate(active):
            if r is None:
                continue
            fed[s] += len(feeds[s])
            if fed[s] >= len(r.prompt):  # the prompt is in: this step's logits predict a token
                r.tokens.append(int(nxt[s]))
                if r.record_logits:
                    r.logits.append(np.asarray(logits[s]))
        if on_step is not None:
            on_step()
    return requests


def generate(
    model: Llama | Runner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seeds: Sequence[int] | None = None,
    prefill_chunk: int | None = None,
    return_logits: bool = False,
) -> tuple[list[list[int]], list[np.ndarray] | None]:
    """Generate ``max_new_tokens`` for each prompt (ragged prompts are fine), all in one batch.

    ``temperature`` 0 is greedy; otherwise request ``i`` samples with seed ``seeds[i]`` (default
    ``i``). Returns ``(tokens, logits)``: per prompt the generated token ids and, with
    ``return_logits``, the ``[max_new_tokens, vocab]`` fp32 logits that produced them.
    """
    runner = model if isinstance(model, Runner) else Runner(model)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    reqs = [Request(list(p), max_new_tokens, seed=s, temperature=temperature,
                    record_logits=return_logits) for p, s in zip(prompts, seeds, strict=True)]
    serve(runner, reqs, slots=len(reqs), prefill_chunk=prefill_chunk)
    logits = [np.stack(r.logits) for r in reqs] if return_logits else None
    return [r.tokens for r in reqs], logits


def param_count(model: nnx.Module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
