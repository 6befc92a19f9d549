"""A small pre-LN text transformer: the text tower of CLIP/SigLIP (`jtl.objectives.clip`).

tokens int32 [B, L] (PAD_ID = 0 is padding, see `jtl.text`) -> embeddings float32 [B, embed_dim].
Token embeddings plus learned positions, `depth` pre-LN blocks (x + MHA(LN(x)), x + MLP(LN(x)), as
in GPT-2 / CLIP's text encoder), a final LayerNorm, pooling, and a bias-free linear projection into
the joint space (CLIP, Radford et al. 2021, Sec. 2.4). Attention is bidirectional with padding keys
masked out, and its key projection has no bias (see `SelfAttention`). Pooling: `eos` takes the
output at the first EOS_ID (CLIP's choice), `mean` averages the real (non-padding) tokens. Not in
the image model registry: it is not a `Classifier`; CLIP builds it from `config.clip` (`text_*`
keys) through `build_text_tower`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl import text as tokenizer
from jtl.errors import ConfigError

POOLINGS = ("eos", "mean")


class SelfAttention(nn.Module):
  """Multi-head self-attention over real keys. The key projection has no bias: a key bias adds
  q.b to every logit of a query's row, which softmax ignores, so it would be a parameter with an
  exactly-zero gradient (rounding noise that Adam turns into full-size steps)."""
  width: int
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_mask: jnp.ndarray) -> jnp.ndarray:
    head_dim = self.width // self.heads

    def project(name: str, use_bias: bool = True) -> jnp.ndarray:
      return nn.DenseGeneral((self.heads, head_dim), use_bias=use_bias, dtype=self.dtype,
                             name=name)(x)
    query, key, value = project("query"), project("key", use_bias=False), project("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) / math.sqrt(head_dim)
    # A large finite negative, not -inf: a row with no real key still gives a finite softmax.
    logits = jnp.where(key_mask[:, None, None, :], logits, -1e30)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return nn.DenseGeneral(self.width, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class TextBlock(nn.Module):
  """Pre-LN transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""
  width: int
  heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_mask: jnp.ndarray) -> jnp.ndarray:
    y = nn.LayerNorm(dtype=self.dtype, name="ln_attention")(x)
    x = x + SelfAttention(self.width, self.heads, self.dtype, name="attention")(y, key_mask)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    y = nn.Dense(self.width * self.mlp_ratio, dtype=self.dtype, name="mlp_in")(y)
    y = nn.Dense(self.width, dtype=self.dtype, name="mlp_out")(nn.gelu(y))
    return x + y


class TextTransformer(nn.Module):
  """Tokens [B, L] -> pooled, projected text embeddings [B, embed_dim] (float32)."""
  vocab_size: int
  max_len: int
  embed_dim: int
  width: int = 64
  depth: int = 2
  heads: int = 4
  mlp_ratio: int = 4
  pooling: str = "eos"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    length = tokens.shape[1]
    if length > self.max_len:
      raise ConfigError(f"text of {length} tokens is longer than the tower's "
                        f"max_len={self.max_len}")
    is_real = tokens != tokenizer.PAD_ID
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(tokens)
    positions = self.param("position_embedding", nn.initializers.normal(0.01),
                           (self.max_len, self.width))
    x = (x + positions[:length]).astype(self.dtype)
    for i in range(self.depth):
      x = TextBlock(self.width, self.heads, self.mlp_ratio, self.dtype, name=f"block{i}")(
          x, is_real)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x).astype(jnp.float32)
    if self.pooling == "eos":
      eos_position = jnp.argmax(tokens == tokenizer.EOS_ID, axis=1)  # 0 if there is none (padding)
      pooled = jnp.take_along_axis(x, eos_position[:, None, None], axis=1)[:, 0]
    else:
      weights = is_real.astype(jnp.float32)[..., None]
      pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return nn.Dense(self.embed_dim, use_bias=False, name="projection")(pooled)


def build_text_tower(*, embed_dim: int, max_len: int, width: int, depth: int, heads: int,
                     mlp_ratio: int, pooling: str, dtype: Any = jnp.float32) -> TextTransformer:
  """A `TextTransformer` over `jtl.text`'s vocabulary; ConfigError on a bad option."""
  for key, value in (("embed_dim", embed_dim), ("text_width", width), ("text_depth", depth),
                     ("text_heads", heads), ("text_mlp_ratio", mlp_ratio), ("max_len", max_len)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"clip.{key} must be a positive integer, got {value!r}; set "
                        f"--config.clip.{key}")
  if width % heads:
    raise ConfigError(f"clip.text_width={width} must be divisible by clip.text_heads={heads}; "
                      "change one of them")
  if pooling not in POOLINGS:
    raise ConfigError(f"unknown clip.text_pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
  if max_len < tokenizer.MIN_MAX_LEN:
    raise ConfigError(f"clip.max_len={max_len} is shorter than the longest caption "
                      f"({tokenizer.MIN_MAX_LEN} tokens with EOS); set --config.clip.max_len >= "
                      f"{tokenizer.MIN_MAX_LEN}")
  return TextTransformer(vocab_size=tokenizer.vocab_size(), max_len=max_len, embed_dim=embed_dim,
                         width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                         pooling=pooling, dtype=dtype)
