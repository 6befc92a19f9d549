"""Registry backbones run stage by stage, for the multitask archs that act between stages.

Cross-stitch, sluice, low-supervision and adaptive multitask networks (`jtl.multitask.archs`) mix,
read or branch the trunk's activations after each stage. `staged(model_config)` returns a
`StagedBackbone` with the same submodules, names and parameters as the registry model's backbone:

  trunk = staged(config.model)                # unbound linen module
  x = trunk.stage(x, train, k)                # stage k = 1..trunk.num_stages, applied in order
  features = trunk.pool(x)                    # [B, D], the registry backbone's output
  trunk(x, train) == models.build(config.model, num_classes=0).backbone(x, train)  # same params

Stages (k is 1-based; stage k's parameters are those of the registry names `stage_prefixes(k)`):
  mlp            flatten (stage 1), then `dense{k-1}` (-> `bn{k-1}`) -> relu; pool: identity
  cnn_small      (2x2 max-pool if k > 1 and the map is >= 2x2, as `SmallCNN`) -> `stage{k}`
                 (ConvBNReLU); pool: global average
  resnet_*       stage 1 = the stem (`stem_conv`, `stem_bn`, the imagenet stem's max-pool) and the
                 blocks `stage1_block*`; stage k > 1 = the blocks `stage{k}_block*`; pool: global average

The ResNet stem is folded into stage 1 so that stage k means the registry's `stage{k}` for every
model (the numbering `transfer_digits` re-initialises by) and a one-conv stem is not a stage of its
own to attach a task or a cross-stitch unit to. A stage's output is the activation before the next
stage's max-pool, so a cross-stitch unit or a task head after stage k sees stage k's full map.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jtl.errors import ConfigError
from jtl.models import cpu_ops, registry, resnet, small
from jtl.models.layers import BatchNorm

STAGED_MODELS = ("mlp", "cnn_small", "resnet_small", "resnet18", "resnet34", "resnet50", "resnet101")


def global_pool(x: jnp.ndarray) -> jnp.ndarray:
  """[B, ..., C] -> [B, C]: average over the spatial axes (identity for [B, C])."""
  return x if x.ndim == 2 else jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


class StagedBackbone(nn.Module):
  """Base class: `stage(x, train, k)` for k = 1..num_stages, then `pool`; `__call__` runs them all."""

  @property
  def num_stages(self) -> int:
    return len(self.stage_widths)

  @property
  def stage_widths(self) -> tuple[int, ...]:
    """Channels (features) of each stage's output."""
    raise NotImplementedError

  def stage_prefixes(self, k: int) -> tuple[str, ...]:
    """Names of the registry submodules (top level of the backbone) that stage k owns."""
    raise NotImplementedError

  def stage(self, x: jnp.ndarray, train: bool, k: int) -> jnp.ndarray:
    raise NotImplementedError

  def pool(self, x: jnp.ndarray) -> jnp.ndarray:
    """A stage's output -> [B, C], as the registry backbone pools its last stage."""
    return global_pool(x)

  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    for k in range(1, self.num_stages + 1):
      x = self.stage(x, train, k)
    return self.pool(x)


class StagedMLP(StagedBackbone):
  """`small.MLP` by hidden layer."""
  hidden: Sequence[int] = (256, 256)
  use_bn: bool = False
  dtype: Any = jnp.float32

  @property
  def stage_widths(self) -> tuple[int, ...]:
    return tuple(self.hidden)

  def stage_prefixes(self, k: int) -> tuple[str, ...]:
    return (f"dense{k - 1}", f"bn{k - 1}") if self.use_bn else (f"dense{k - 1}",)

  @nn.compact
  def stage(self, x: jnp.ndarray, train: bool, k: int) -> jnp.ndarray:
    if k == 1:
      x = x.reshape(x.shape[0], -1).astype(self.dtype)
    x = nn.Dense(self.hidden[k - 1], dtype=self.dtype, name=f"dense{k - 1}")(x)
    if self.use_bn:
      x = BatchNorm(dtype=self.dtype, name=f"bn{k - 1}")(x, train)
    return nn.relu(x)


class StagedCNN(StagedBackbone):
  """`small.SmallCNN` by ConvBNReLU stage."""
  widths: Sequence[int] = (32, 64, 128)
  dtype: Any = jnp.float32
  fast_paths: cpu_ops.FastPaths = cpu_ops.FastPaths()  # CPU formulations (cpu_ops.py)

  @property
  def stage_widths(self) -> tuple[int, ...]:
    return tuple(self.widths)

  def stage_prefixes(self, k: int) -> tuple[str, ...]:
    return (f"stage{k}",)

  @nn.compact
  def stage(self, x: jnp.ndarray, train: bool, k: int) -> jnp.ndarray:
    x = x.astype(self.dtype)
    if k > 1 and min(x.shape[1:3]) >= 2:
      x = self.fast_paths.max_pool(x, (2, 2), strides=(2, 2))
    return small.ConvBNReLU(self.widths[k - 1], dtype=self.dtype, fast_paths=self.fast_paths,
                            name=f"stage{k}")(x, train)


class StagedResNet(StagedBackbone):
  """`resnet.ResNet` by residual stage (the stem belongs to stage 1)."""
  stage_sizes: Sequence[int] = (2, 2, 2)
  bottleneck: bool = False
  width: int = 64
  stem: str = "imagenet"
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  fast_paths: cpu_ops.FastPaths = cpu_ops.FastPaths()  # CPU formulations (cpu_ops.py)

  @property
  def stage_widths(self) -> tuple[int, ...]:
    expansion = 4 if self.bottleneck else 1
    return tuple(self.width * 2 ** i * expansion for i in range(len(self.stage_sizes)))

  def stage_prefixes(self, k: int) -> tuple[str, ...]:
    blocks = tuple(f"stage{k}_block{j}" for j in range(self.stage_sizes[k - 1]))
    return (("stem_conv", "stem_bn") if k == 1 else ()) + blocks

  @nn.compact
  def stage(self, x: jnp.ndarray, train: bool, k: int) -> jnp.ndarray:
    if k == 1:
      x = x.astype(self.dtype)
      kernel, strides = (7, 2) if self.stem == "imagenet" else (3, 1)
      x = resnet._conv(self.width, kernel, strides, self.dtype, "stem_conv",  # the registry's conv
                       self.fast_paths)(x)
      x = nn.relu(BatchNorm(dtype=self.dtype, name="stem_bn")(x, train))
      if self.stem == "imagenet":
        x = self.fast_paths.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for j in range(self.stage_sizes[k - 1]):
      x = resnet.ResidualBlock(
          features=self.width * 2 ** (k - 1), bottleneck=self.bottleneck,
          strides=2 if k > 1 and j == 0 else 1, zero_init_residual=self.zero_init_residual,
          dtype=self.dtype, fast_paths=self.fast_paths, name=f"stage{k}_block{j}")(x, train)
    return x


def staged(model_config: Mapping[str, Any], needed_by: str = "") -> StagedBackbone:
  """The registry model `model_config.name` (its options validated by the registry) as stages.

  Args:
    model_config: the run's `config.model` (name and options; `num_classes` is ignored).
    needed_by: what needs the stages, for the error message (e.g. "arch 'sluice'").

  Raises:
    ConfigError: the model has no staged form, or has no stage at all (an MLP with `hidden=()`).
  """
  backbone = registry.build(model_config, num_classes=0).backbone
  if isinstance(backbone, small.MLP):
    trunk = StagedMLP(hidden=tuple(backbone.hidden), use_bn=backbone.use_bn, dtype=backbone.dtype)
  elif isinstance(backbone, small.SmallCNN):
    trunk = StagedCNN(widths=tuple(backbone.widths), dtype=backbone.dtype,
                      fast_paths=backbone.fast_paths)
  elif isinstance(backbone, resnet.ResNet):
    trunk = StagedResNet(stage_sizes=tuple(backbone.stage_sizes), bottleneck=backbone.bottleneck,
                         width=backbone.width, stem=backbone.stem,
                         zero_init_residual=backbone.zero_init_residual, dtype=backbone.dtype,
                         fast_paths=backbone.fast_paths)
  else:
    who = f"{needed_by}, but " if needed_by else ""
    raise ConfigError(f"{who}model {model_config['name']!r} has no stages; use one of "
                      f"{', '.join(STAGED_MODELS)} (--config.model.name)")
  if trunk.num_stages == 0:
    raise ConfigError(f"model {model_config['name']!r} has no stage to run (empty hidden/widths); "
                      "give it at least one layer (--config.model.hidden)")
  return trunk
