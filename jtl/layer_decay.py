"""Layer-wise learning-rate decay (BEiT / timm): the leaf at depth d from the top gets decay ** d.

Layers are read off the parameter paths, which every registered model names the same way, so depth is
known for every model (and for multitask trunks and towers built from them):

  layer 0                 the input embedding: `stem_*` (ResNets), `patch_embed`, `cls_token`,
                          `pos_embed` (ViTs)
  layers 1..L-1, in order `stage<i>_block<j>` (ResNet blocks), `block<i>` (ViT blocks), `stage<i>`
                          (cnn_small stages), `dense<i>` / `bn<i>` (MLP layers)
  layer L (the top)       everything else: the head, a ViT's final `norm`, projection heads, task heads

So the head's scale is 1, the last block's `decay`, ..., the stem's `decay ** L`. The multipliers
compose with `optim.lr_mults` (they multiply). A multiplier is never 0: freezing is the mask's job.
"""
from __future__ import annotations

import re
from typing import Any

import jax

from jtl import masks

_EMBEDDING = re.compile(r"(^|/)(stem_\w+|patch_embed|cls_token|pos_embed)(/|$)")
_LAYER_PATTERNS = (
    re.compile(r"(?:^|/)stage(\d+)_block(\d+)(?:/|$)"),  # ResNet blocks: (stage, block)
    re.compile(r"(?:^|/)block(\d+)(?:/|$)"),  # ViT blocks
    re.compile(r"(?:^|/)stage(\d+)(?:/|$)"),  # cnn_small stages
    re.compile(r"(?:^|/)(?:dense|bn)(\d+)(?:/|$)"),  # MLP layers
)


def _layer_key(path: str) -> tuple[int, ...] | None:
  """(0,) for the embedding, (1, i, ...) for a numbered layer, None for the top."""
  if _EMBEDDING.search(path):
    return (0,)
  for pattern in _LAYER_PATTERNS:
    match = pattern.search(path)
    if match:
      return (1, *(int(g) for g in match.groups()))
  return None


def layer_ids(params: Any, prefix: str = "params") -> tuple[Any, int]:
  """(tree of layer numbers 0..L, L) for a params tree."""
  paths = masks.leaf_paths(params, prefix)
  keys = [_layer_key(p) for p in paths]
  order = {k: i for i, k in enumerate(sorted({k for k in keys if k is not None}))}
  top = len(order)
  ids = [order[k] if k is not None else top for k in keys]
  return jax.tree.unflatten(jax.tree.structure(params), ids), top


def multipliers(params: Any, decay: float, prefix: str = "params") -> Any:
  """decay ** (L - layer) per leaf: 1.0 at the top (head), decay ** L at the embedding."""
  ids, top = layer_ids(params, prefix)
  return jax.tree.map(lambda i: float(decay) ** (top - i), ids)
