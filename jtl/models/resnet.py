"""ResNets: torchvision's ImageNet models (resnet18/34/50/101) and a CIFAR-style `resnet_small`.

Submodule names follow torchvision so a PyTorch state_dict maps one to one:
  conv1 / bn1                    -> stem_conv / stem_bn
  layer{i}.{j}.conv{k} / bn{k}   -> stage{i}_block{j}/conv{k} / bn{k}
  layer{i}.{j}.downsample.0 / .1 -> stage{i}_block{j}/downsample_conv / downsample_bn
  fc                             -> head (in `Classifier`)
(conv weight OIHW -> kernel HWIO; BN running_mean/var -> batch_stats mean/var.)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jtl.errors import ConfigError
from jtl.models import cpu_ops
from jtl.models.classifier import Classifier, check_positive_ints, make_classifier
from jtl.models.layers import BatchNorm, conv_kernel_init
from jtl.models.registry import register


def _conv(features: int, kernel: int, strides: int, dtype: Any, name: str,
          fast_paths: cpu_ops.FastPaths) -> nn.Conv:
  # Symmetric padding kernel // 2, as PyTorch; 'SAME' would pad strided convs asymmetrically.
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=kernel // 2,
                 use_bias=False, kernel_init=conv_kernel_init, dtype=dtype, name=name,
                 conv_general_dilated=fast_paths.conv_general_dilated)


class ResidualBlock(nn.Module):
  """BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3 with the stride (v1.5), 1x1 expanding 4x).

  Attributes:
    features: width of the block's inner convs; the output has `features * expansion` channels.
    bottleneck: Bottleneck if True, else BasicBlock.
    strides: stride of the block (on the 3x3 conv and the projection shortcut).
    zero_init_residual: start the last BN's scale at zero, so the block starts as the identity.
  """
  features: int
  bottleneck: bool = False
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  fast_paths: cpu_ops.FastPaths = cpu_ops.FastPaths()  # CPU formulations (cpu_ops.py)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    if self.bottleneck:
      convs = [(self.features, 1, 1), (self.features, 3, self.strides), (self.features * 4, 1, 1)]
    else:
      convs = [(self.features, 3, self.strides), (self.features, 3, 1)]
    y = x
    for k, (width, kernel, strides) in enumerate(convs, start=1):
      y = _conv(width, kernel, strides, self.dtype, f'conv{k}', self.fast_paths)(y)
      last = k == len(convs)
      zero_scale = last and self.zero_init_residual
      scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
      y = BatchNorm(dtype=self.dtype, scale_init=scale_init, name=f'bn{k}')(y, train)
      if not last:
        y = nn.relu(y)
    out_features = convs[-1][0]
    if self.strides != 1 or x.shape[-1] != out_features:
      x = _conv(out_features, 1, self.strides, self.dtype, 'downsample_conv', self.fast_paths)(x)
      x = BatchNorm(dtype=self.dtype, name='downsample_bn')(x, train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet backbone returning globally average-pooled features `[B, D]`.

  Attributes:
    stage_sizes: number of blocks per stage; stage i (1-based) has width `width * 2**(i-1)` and
      stride 2 except the first.
    bottleneck: Bottleneck blocks (resnet50+) instead of BasicBlocks.
    width: width of the stem and the first stage.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no pooling).
    zero_init_residual: zero-init the last BN scale of every block (torchvision default: False).
    remat: rematerialise each block in the backward pass (less activation memory, more compute).
  """
  stage_sizes: Sequence[int]
  bottleneck: bool = False
  width: int = 64
  stem: str = 'imagenet'
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  fast_paths: cpu_ops.FastPaths = cpu_ops.FastPaths()  # CPU formulations (cpu_ops.py)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = x.astype(self.dtype)
    # Rematerialised blocks keep only their inputs for the backward pass (`train` is static).
    block = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock
    if self.stem == 'imagenet':
      x = _conv(self.width, 7, 2, self.dtype, 'stem_conv', self.fast_paths)(x)
    else:
      x = _conv(self.width, 3, 1, self.dtype, 'stem_conv', self.fast_paths)(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name='stem_bn')(x, train))
    if self.stem == 'imagenet':
      x = self.fast_paths.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes, start=1):
      for j in range(num_blocks):
        x = block(
            features=self.width * 2 ** (i - 1), bottleneck=self.bottleneck,
            strides=2 if i > 1 and j == 0 else 1, zero_init_residual=self.zero_init_residual,
            dtype=self.dtype, fast_paths=self.fast_paths, name=f'stage{i}_block{j}')(x, train)
    return jnp.mean(x, axis=(1, 2))


def _torchvision(stage_sizes: tuple[int, ...], bottleneck: bool):
  def factory(num_classes: int, zero_init_residual: bool = False, head_init: str = 'zeros',
              dtype: Any = jnp.float32, remat: bool = False,
              cpu_fast_paths: bool = True) -> Classifier:
    backbone = ResNet(stage_sizes=stage_sizes, bottleneck=bottleneck, width=64, stem='imagenet',
                      zero_init_residual=zero_init_residual, dtype=dtype, remat=remat,
                      fast_paths=cpu_ops.from_option(cpu_fast_paths))
    return make_classifier(backbone, num_classes, head_init, dtype)
  factory.__doc__ = f'torchvision ResNet with stage sizes {stage_sizes}.'
  return factory


resnet18 = register('resnet18')(_torchvision((2, 2, 2, 2), bottleneck=False))
resnet34 = register('resnet34')(_torchvision((3, 4, 6, 3), bottleneck=False))
resnet50 = register('resnet50')(_torchvision((3, 4, 6, 3), bottleneck=True))
resnet101 = register('resnet101')(_torchvision((3, 4, 23, 3), bottleneck=True))


@register('resnet_small')
def resnet_small(num_classes: int, stage_sizes: Sequence[int] = (2, 2, 2), width: int = 16,
                 bottleneck: bool = False, zero_init_residual: bool = False,
                 head_init: str = 'zeros', dtype: Any = jnp.float32,
                 remat: bool = False, cpu_fast_paths: bool = True) -> Classifier:
  """CIFAR-style ResNet: 3x3 stem, no max-pool, stage widths width * (1, 2, 4, ...)."""
  check_positive_ints('stage_sizes', tuple(stage_sizes))
  check_positive_ints('width', width)
  if not isinstance(bottleneck, bool):
    raise ConfigError(f'bottleneck must be True or False, got {bottleneck!r} '
                      '(--config.model.bottleneck)')
  backbone = ResNet(stage_sizes=tuple(stage_sizes), bottleneck=bottleneck, width=width,
                    stem='cifar', zero_init_residual=zero_init_residual, dtype=dtype, remat=remat,
                    fast_paths=cpu_ops.from_option(cpu_fast_paths))
  return make_classifier(backbone, num_classes, head_init, dtype)
