"""Small models for tiny images (8x8 digits and the like): an MLP and a small CNN."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jtl.models import cpu_ops
from jtl.models.classifier import Classifier, check_positive_ints, make_classifier
from jtl.models.layers import BatchNorm, conv_kernel_init
from jtl.models.registry import register


class MLP(nn.Module):
  """Flatten, then `dense{i}` (-> `bn{i}`) -> relu per hidden layer; returns the last activation."""
  hidden: Sequence[int] = (256, 256)
  use_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, dtype=self.dtype, name=f'dense{i}')(x)
      if self.use_bn:
        x = BatchNorm(dtype=self.dtype, name=f'bn{i}')(x, train)
      x = nn.relu(x)
    return x


class ConvBNReLU(nn.Module):
  """3x3 conv (no bias) -> BatchNorm -> relu, as submodules `conv` and `bn`."""
  features: int
  dtype: Any = jnp.float32
  fast_paths: cpu_ops.FastPaths = cpu_ops.FastPaths()  # CPU formulations (cpu_ops.py)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, kernel_init=conv_kernel_init,
                dtype=self.dtype, conv_general_dilated=self.fast_paths.conv_general_dilated,
                name='conv')(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name='bn')(x, train))


class SmallCNN(nn.Module):
  """Stages `stage1..N` of ConvBNReLU, 2x2 max-pool between them while >= 2x2, global avg pool."""
  widths: Sequence[int] = (32, 64, 128)
  dtype: Any = jnp.float32
  remat: bool = False  # rematerialise each stage in the backward pass
  fast_paths: cpu_ops.FastPaths = cpu_ops.FastPaths()  # CPU formulations (cpu_ops.py)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = x.astype(self.dtype)
    stage = nn.remat(ConvBNReLU, static_argnums=(2,)) if self.remat else ConvBNReLU
    for i, width in enumerate(self.widths):
      if i > 0 and min(x.shape[1:3]) >= 2:
        x = self.fast_paths.max_pool(x, (2, 2), strides=(2, 2))
      x = stage(width, dtype=self.dtype, fast_paths=self.fast_paths,
                name=f'stage{i + 1}')(x, train)
    return jnp.mean(x, axis=(1, 2))


@register('mlp')
def mlp(num_classes: int, hidden: Sequence[int] = (256, 256), use_bn: bool = False,
        head_init: str = 'zeros', dtype: Any = jnp.float32) -> Classifier:
  """MLP on flattened pixels."""
  check_positive_ints('hidden', tuple(hidden), allow_empty=True)
  return make_classifier(MLP(hidden=tuple(hidden), use_bn=use_bn, dtype=dtype), num_classes,
                         head_init, dtype)


@register('cnn_small')
def cnn_small(num_classes: int, widths: Sequence[int] = (32, 64, 128), head_init: str = 'zeros',
              dtype: Any = jnp.float32, remat: bool = False,
              cpu_fast_paths: bool = True) -> Classifier:
  """Small CNN with BatchNorm for 8x8 to 32x32 images."""
  check_positive_ints('widths', tuple(widths))
  backbone = SmallCNN(widths=tuple(widths), dtype=dtype, remat=remat,
                      fast_paths=cpu_ops.from_option(cpu_fast_paths))
  return make_classifier(backbone, num_classes, head_init, dtype)
