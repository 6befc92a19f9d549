"""Vision Transformer (pre-LN), with timm-style names so a timm/PyTorch state_dict maps one to one:

  patch_embed.proj -> patch_embed      cls_token -> cls_token      pos_embed -> pos_embed
  blocks.{i}.norm1/norm2 -> block{i}/norm1, norm2
  blocks.{i}.attn.qkv/proj -> block{i}/attn/{query,key,value,out} (qkv split and reshaped per head)
  blocks.{i}.mlp.fc1/fc2 -> block{i}/mlp/fc1, fc2
  norm -> norm      head -> head (in `Classifier`)

LayerNorm epsilon is 1e-6 (as the original ViT and timm). With `pool='gap'` there is no class token.
Dropout > 0 needs `rngs={'dropout': key}` in `apply` when `train=True`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jtl.errors import ConfigError
from jtl.models import cpu_ops
from jtl.models.classifier import Classifier, check_positive_ints, make_classifier
from jtl.models.layers import gelu
from jtl.models.registry import register

_dense_init = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros)
POOLS = ('cls', 'gap')


class MlpBlock(nn.Module):
  """fc1 -> GELU -> dropout -> fc2 -> dropout."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name='fc1', **_dense_init)(x)
    x = gelu(x)  # exact GELU, as PyTorch/timm
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(width, dtype=self.dtype, name='fc2', **_dense_init)(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm1')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.attention_dropout,
        deterministic=not train, name='attn', **_dense_init)(y, y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm2')(x)
    return x + MlpBlock(self.mlp_dim, self.dropout, self.dtype, name='mlp')(y, train)


class ViT(nn.Module):
  """ViT backbone: the final-LayerNorm'd class token (`pool='cls'`) or token mean (`'gap'`)."""
  patch_size: int = 16
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  pool: str = 'cls'
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False  # rematerialise each block in the backward pass
  fast_paths: cpu_ops.FastPaths = cpu_ops.FastPaths()  # CPU formulations (cpu_ops.py)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ConfigError(f'image size {x.shape[1]}x{x.shape[2]} is not divisible by patch_size {p}; '
                        'pick a patch_size that divides it (--config.model.patch_size)')
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                conv_general_dilated=self.fast_paths.conv_general_dilated,
                name='patch_embed')(x.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    if self.pool == 'cls':
      cls = self.param('cls_token', nn.initializers.zeros, (1, 1, self.width))
      cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width))
      x = jnp.concatenate([cls, x], axis=1)
    pos = self.param('pos_embed', nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    x = nn.Dropout(self.dropout, deterministic=not train)(x + pos.astype(self.dtype))
    block = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout,
                       self.dtype, name=f'block{i}')(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    return x[:, 0] if self.pool == 'cls' else jnp.mean(x, axis=1)


@register('vit')
def vit(num_classes: int, patch_size: int = 16, width: int = 192, depth: int = 12,
        num_heads: int = 3, mlp_dim: int = 768, pool: str = 'cls', dropout: float = 0.0,
        attention_dropout: float = 0.0, head_init: str = 'zeros',
        dtype: Any = jnp.float32, remat: bool = False,
        cpu_fast_paths: bool = True) -> Classifier:
  """ViT with every dimension configurable (defaults: Ti/16)."""
  for name, value in [('patch_size', patch_size), ('width', width), ('depth', depth),
                      ('num_heads', num_heads), ('mlp_dim', mlp_dim)]:
    check_positive_ints(name, value)
  if width % num_heads:
    raise ConfigError(f'width {width} is not divisible by num_heads {num_heads} '
                      '(--config.model.width / --config.model.num_heads)')
  if pool not in POOLS:
    raise ConfigError(f'unknown pool {pool!r}; choose one of: {", ".join(POOLS)} '
                      '(--config.model.pool)')
  for name, rate in [('dropout', dropout), ('attention_dropout', attention_dropout)]:
    if not 0.0 <= rate < 1.0:
      raise ConfigError(f'{name} must be in [0, 1), got {rate!r} (--config.model.{name})')
  backbone = ViT(patch_size=patch_size, width=width, depth=depth, num_heads=num_heads,
                 mlp_dim=mlp_dim, pool=pool, dropout=dropout, attention_dropout=attention_dropout,
                 dtype=dtype, remat=remat, fast_paths=cpu_ops.from_option(cpu_fast_paths))
  return make_classifier(backbone, num_classes, head_init, dtype)


def _preset(width: int, depth: int, num_heads: int, mlp_dim: int):
  def factory(num_classes: int, patch_size: int = 16, pool: str = 'cls', dropout: float = 0.0,
              attention_dropout: float = 0.0, head_init: str = 'zeros',
              dtype: Any = jnp.float32, remat: bool = False,
              cpu_fast_paths: bool = True) -> Classifier:
    return vit(num_classes, patch_size, width, depth, num_heads, mlp_dim, pool, dropout,
               attention_dropout, head_init, dtype, remat, cpu_fast_paths)
  factory.__doc__ = f'ViT with width {width}, depth {depth}, {num_heads} heads, MLP {mlp_dim}.'
  return factory


vit_tiny = register('vit_tiny')(_preset(192, 12, 3, 768))
vit_small = register('vit_small')(_preset(384, 12, 6, 1536))
vit_base = register('vit_base')(_preset(768, 12, 12, 3072))
