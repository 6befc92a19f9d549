"""ViT names -> jtl's `vit` (Dosovitskiy et al., 2021; pre-LN, as `jtl.models.vit`): timm state
dicts, and the .npz checkpoints of vit_jax and big_vision.

timm (PyTorch layouts, see `naming`):
  patch_embed.proj -> backbone/patch_embed    cls_token, pos_embed -> backbone/cls_token, pos_embed
  blocks.{i}.norm1/norm2, mlp.fc1/fc2 -> backbone/block{i}/norm1/norm2, mlp/fc1/fc2
  blocks.{i}.attn.qkv [3D, D] -> block{i}/attn/{query,key,value}: rows ordered (q|k|v, head,
    head_dim) as timm's reshape(B, N, 3, H, hd), so each third is transposed and reshaped to
    [D, H, hd] (bias [H, hd])
  blocks.{i}.attn.proj [D, D] -> block{i}/attn/out [H, hd, D] (its input is the heads concatenated)
  norm -> backbone/norm        head -> head
vit_jax / big_vision (Flax layouts already; optional prefix `opt/target/`, `params/`,
`params/img/`):
  embedding -> patch_embed     cls -> cls_token     Transformer/encoder_norm -> norm    head -> head
  Transformer/encoderblock_{i}/LayerNorm_0 -> block{i}/norm1
    vit_jax:    MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3/Dense_{0,1}
    big_vision: MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0/Dense_{0,1}
  (big_vision's scanned layout `Transformer/encoderblock/...` stacks the blocks on axis 0)
  vit_jax:    Transformer/posembed_input/pos_embedding [1, 1 + N, D] (class token row first)
  big_vision: pos_embedding [1, N, D], added *before* the class token is prepended; jtl adds
    pos_embed after, so the class-token row becomes zeros (the same sum).
`pre_logits` (vit_jax's representation layer) and `MAPHead_0` have no jtl counterpart (unexpected).
A pos_embed whose grid differs from the model's is resized bilinearly (half-pixel centres, no
antialiasing: torch's `F.interpolate(mode="bilinear", align_corners=False)`, as timm uses for these
files), class-token row kept: the 2D interpolation of pre-trained position embeddings of
Dosovitskiy et al. (2021, Sec. 3.2) for fine-tuning at another resolution.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from jtl.errors import ConfigError
from jtl.pretrained.naming import Convention, Rule, TorchModuleTable, flatten, split_path

BIG_VISION_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def _split_qkv(weight: np.ndarray, part: int, heads: tuple[int, ...]) -> np.ndarray:
  if weight.shape[0] % 3:
    raise ValueError(f"qkv rows {weight.shape[0]} not divisible by 3")
  third = weight.shape[0] // 3
  chunk = weight[part * third:(part + 1) * third]
  if chunk.ndim == 2:  # kernel: [D_out, D_in] -> [D_in, H, hd]
    return chunk.T.reshape(chunk.shape[1], *heads)
  return chunk.reshape(heads)


def _proj_to_out(weight: np.ndarray, heads: tuple[int, ...]) -> np.ndarray:
  return weight.T.reshape(*heads, weight.shape[0])  # [D_out, H*hd] -> [H, hd, D_out]


class TimmViT(TorchModuleTable):
  """timm `VisionTransformer` state dicts (class token, learned pos_embed, no fc_norm)."""

  def __init__(self):
    super().__init__("timm ViT", modules=[
        (r"backbone/patch_embed", "patch_embed.proj"),
        (r"backbone/block(\d+)/(norm1|norm2)", r"blocks.\1.\2"),
        (r"backbone/block(\d+)/mlp/(fc1|fc2)", r"blocks.\1.mlp.\2"),
        (r"backbone/block(\d+)/attn/out", r"blocks.\1.attn.proj"),
        (r"backbone/norm", "norm"),
        (r"head", "head"),
    ])

  def rule(self, path: str, shape: tuple[int, ...]) -> Rule | None:
    _, rest = split_path(path)
    if rest in ("backbone/cls_token", "backbone/pos_embed"):
      return Rule((rest.split("/")[1],))
    match = re.fullmatch(r"backbone/block(\d+)/attn/(query|key|value)/(kernel|bias)", rest)
    if match:
      block, which, leaf = match.groups()
      heads = shape[-2:] if leaf == "kernel" else shape
      name = f"blocks.{block}.attn.qkv.{'weight' if leaf == 'kernel' else 'bias'}"
      part = ("query", "key", "value").index(which)
      return Rule((name,), functools.partial(_split_qkv, part=part, heads=heads))
    match = re.fullmatch(r"backbone/block(\d+)/attn/out/kernel", rest)
    if match:
      return Rule((f"blocks.{match.group(1)}.attn.proj.weight",),
                  functools.partial(_proj_to_out, heads=shape[:2]))
    return super().rule(path, shape)


def _scan_layer(stacked: np.ndarray, index: int) -> np.ndarray:
  if index >= stacked.shape[0]:
    raise ValueError(f"block {index} of a {stacked.shape[0]}-block scan")
  return stacked[index]


class BigVisionViT(Convention):
  """vit_jax / big_vision .npz names (see the module docstring); Flax layouts, so identity except
  for the scanned layout's block index."""

  def __init__(self, prefix: str = "", vit_jax: bool = False, scan_depth: int | None = None,
               posemb: str = "pos_embedding"):
    self.name = "vit_jax ViT" if vit_jax else "big_vision ViT"
    self.prefix, self.scan_depth, self.posemb = prefix, scan_depth, posemb
    self._block_modules = {
        "norm1": "LayerNorm_0", "norm2": "LayerNorm_2" if vit_jax else "LayerNorm_1",
        "attn": f"MultiHeadDotProductAttention_{1 if vit_jax else 0}",
        "mlp": f"MlpBlock_{3 if vit_jax else 0}"}
    self._blocks_used = 0

  @classmethod
  def from_tensors(cls, tensors: Mapping[str, np.ndarray]) -> BigVisionViT | None:
    prefix = next((p for p in BIG_VISION_PREFIXES if f"{p}embedding/kernel" in tensors), None)
    if prefix is None:
      return None
    scan_key = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"
    posembs = [f"{prefix}{n}" for n in ("pos_embedding", "Transformer/posembed_input/pos_embedding",
                                        "Transformer/pos_embedding")]
    return cls(prefix=prefix,
               vit_jax=any("/MultiHeadDotProductAttention_1/" in k for k in tensors),
               scan_depth=tensors[scan_key].shape[0] if scan_key in tensors else None,
               posemb=next((n for n in posembs if n in tensors), posembs[0]))

  def rule(self, path: str, shape: tuple[int, ...]) -> Rule | None:
    collection, rest = split_path(path)
    if collection != "params":
      return None
    p = self.prefix
    fixed = {"backbone/cls_token": f"{p}cls", "backbone/pos_embed": self.posemb}
    if rest in fixed:
      return Rule((fixed[rest],))
    for jtl_module, file_module in (("backbone/patch_embed/", "embedding/"),
                                    ("backbone/norm/", "Transformer/encoder_norm/"),
                                    ("head/", "head/")):
      if rest.startswith(jtl_module):
        return Rule((p + file_module + rest[len(jtl_module):],))
    match = re.fullmatch(r"backbone/block(\d+)/(norm1|norm2|attn|mlp)/(.+)", rest)
    if not match:
      return None
    index, module, tail = int(match.group(1)), match.group(2), match.group(3)
    tail = re.sub(r"^fc([12])/", lambda m: f"Dense_{int(m.group(1)) - 1}/", tail)
    sub = self._block_modules[module]
    if self.scan_depth is None:
      return Rule((f"{p}Transformer/encoderblock_{index}/{sub}/{tail}",))
    self._blocks_used = max(self._blocks_used, index + 1)
    return Rule((f"{p}Transformer/encoderblock/{sub}/{tail}",),
                functools.partial(_scan_layer, index=index))

  def extra_unexpected(self) -> list[str]:
    if self.scan_depth and self._blocks_used and self._blocks_used < self.scan_depth:
      return [f"{self.prefix}Transformer/encoderblock/* blocks {self._blocks_used}.."
              f"{self.scan_depth - 1} (the model has {self._blocks_used})"]
    return []


def convention_for(tensors: Mapping[str, np.ndarray]) -> Convention | None:
  """timm or vit_jax/big_vision naming if the file's names look like one."""
  keys: Collection[str] = tensors.keys()
  if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys):
    return TimmViT()
  return BigVisionViT.from_tensors(tensors)


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] bilinear weights: half-pixel centres, clamped at the edges."""
  centres = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  low = np.floor(centres).astype(int)
  high = np.minimum(low + 1, n_in - 1)
  frac = centres - low
  matrix = np.zeros((n_out, n_in))
  np.add.at(matrix, (np.arange(n_out), low), 1 - frac)
  np.add.at(matrix, (np.arange(n_out), high), frac)
  return matrix


def resize_grid(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a `[h, w, D]` grid to `[*size, D]` (float32; no antialiasing)."""
  rows = _interpolation_matrix(grid.shape[0], size[0])
  cols = _interpolation_matrix(grid.shape[1], size[1])
  out = np.einsum("Hh,hwd,Ww->HWd", rows, grid.astype(np.float64), cols)
  return out.astype(np.float32)


def _square_side(n: int) -> int | None:
  side = math.isqrt(n) if n > 0 else 0
  return side if side > 0 and side * side == n else None


def adapt_pos_embed(pos: np.ndarray, shape: tuple[int, ...], has_class_token: bool
                    ) -> tuple[np.ndarray | None, str]:
  """Fits a `[1, T, D]` position embedding to the model's `shape` = `[1, T', D]`: adds a zero
  class-token row (big_vision) or drops one (model without class token), and resizes a square grid.
  Returns (None, "") when it cannot (non-square grids, other widths)."""
  if pos.ndim != 3 or pos.shape[0] != 1 or len(shape) != 3 or pos.shape[2] != shape[2]:
    return None, ""
  width, prefix = pos.shape[2], int(has_class_token)
  grid_tokens = shape[1] - prefix
  if prefix and pos.shape[1] == grid_tokens:
    return (np.concatenate([np.zeros((1, 1, width), pos.dtype), pos], axis=1),
            "pos_embed: added a zero class-token row (the file adds no position embedding to its "
            "class token)")
  if not prefix and pos.shape[1] == grid_tokens + 1:
    return pos[:, 1:], ("pos_embed: dropped the file's class-token row (the model has no class "
                        "token)")
  source_prefix = 0 if _square_side(pos.shape[1]) else 1 if _square_side(pos.shape[1] - 1) else None
  side_out = _square_side(grid_tokens)
  if source_prefix is None or side_out is None:
    return None, ""
  side_in = _square_side(pos.shape[1] - source_prefix)
  grid = resize_grid(pos[0, source_prefix:].reshape(side_in, side_in, width), (side_out, side_out))
  parts = [grid.reshape(1, side_out * side_out, width)]
  if prefix:
    parts.insert(0, pos[:, :1].astype(np.float32) if source_prefix else np.zeros((1, 1, width),
                                                                               np.float32))
  kept = ", class-token row kept" if prefix and source_prefix else ""
  return (np.concatenate(parts, axis=1),
          f"pos_embed: grid resized {side_in}x{side_in} -> {side_out}x{side_out} (bilinear){kept}")


def to_big_vision(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """jtl ViT params -> flat big_vision names (unscanned, learned posemb, `pool_type='tok'` or
  `'gap'`). The class token's position embedding is folded into `cls`, as big_vision adds the
  position embedding before prepending the token (same sums, so the same logits)."""
  flat = {k: np.asarray(v) for k, v in flatten(params, "params").items()}
  naming, out = BigVisionViT(), {}
  for path, value in flat.items():
    rule = naming.rule(path, value.shape)
    if rule is None:
      raise ConfigError(f"{path} has no big_vision name; naming='big_vision' saves jtl ViTs only "
                        "(use naming='jtl' for other models)")
    out[rule.sources[0]] = value
  if "params/backbone/cls_token" in flat:
    pos = flat["params/backbone/pos_embed"]
    out["cls"] = flat["params/backbone/cls_token"] + pos[:, :1]
    out["pos_embedding"] = pos[:, 1:]
  return out
