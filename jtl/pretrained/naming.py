"""Naming conventions: which tensors of a file hold each jtl leaf, and in what layout.

A convention is asked from the model's side: for one jtl leaf path (`params/backbone/stem_conv/
kernel`, `model_state/batch_stats/backbone/stem_bn/mean`) and its shape it returns a `Rule` (the
source names, and a function from those arrays to jtl's layout) or None. So a leaf the file lacks is
reported under the name it was looked up as, and every file tensor no rule used is "unexpected".

PyTorch layouts (Linear: y = x W^T + b; NCHW convs) against Flax (Dense: y = x K + b; NHWC):
  conv weight [O, I, kh, kw] -> kernel [kh, kw, I, O];  Linear weight [O, I] -> kernel [I, O];
  norm weight -> scale;  BatchNorm running_mean / running_var -> batch_stats mean / var.
The conventions with equal maths need nothing else: torch's BatchNorm epsilon 1e-5 is jtl's
BatchNorm default and timm's LayerNorm epsilon 1e-6 is jtl's ViT's.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np


def identity(array: np.ndarray) -> np.ndarray:
  return array


def conv_oihw_to_hwio(weight: np.ndarray) -> np.ndarray:
  return np.transpose(weight, (2, 3, 1, 0))


def linear_to_kernel(weight: np.ndarray) -> np.ndarray:
  return np.transpose(weight)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A jtl leaf = `convert(*[file[name] for name in sources])`."""
  sources: tuple[str, ...]
  convert: Callable[..., np.ndarray] = identity


def split_path(path: str) -> tuple[str, str]:
  """`params/backbone/x/kernel` -> ('params', 'backbone/x/kernel');
  `model_state/batch_stats/backbone/bn/mean` -> ('batch_stats', 'backbone/bn/mean')."""
  head, _, rest = path.partition("/")
  if head == "model_state":
    head, _, rest = rest.partition("/")
  return head, rest


class Convention:
  """Base class: subclasses implement `rule`; `ignored` names file tensors that are not weights."""
  name = "?"

  def rule(self, path: str, shape: tuple[int, ...]) -> Rule | None:
    raise NotImplementedError

  def ignored(self, source: str) -> bool:
    return False

  def extra_unexpected(self) -> list[str]:
    """File content no rule used that per-name bookkeeping cannot see (e.g. surplus scan layers)."""
    return []


class JtlNames(Convention):
  """jtl's own paths (what `save_npz` writes): the identity."""
  name = "jtl"

  @staticmethod
  def claims(keys: Collection[str]) -> bool:
    return any(k.startswith(("params/backbone/", "model_state/")) for k in keys)

  def rule(self, path: str, shape: tuple[int, ...]) -> Rule | None:
    return Rule((path,))


def torch_leaf(collection: str, leaf: str, ndim: int
               ) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
  """The torch parameter name and layout change of one Flax leaf of a conv/linear/norm module."""
  if collection == "params":
    if leaf == "kernel":
      return ("weight", conv_oihw_to_hwio) if ndim == 4 else ("weight", linear_to_kernel)
    if leaf == "scale":
      return "weight", identity
    if leaf == "bias":
      return "bias", identity
  if collection == "batch_stats":
    return {"mean": ("running_mean", identity), "var": ("running_var", identity)}.get(leaf)
  return None


class TorchModuleTable(Convention):
  """PyTorch names by a module table: `(jtl module regex, torch module template)`, first match wins
  (templates use `re.Match.expand`, e.g. r"layer\\1.\\2.\\3"); leaves follow `torch_leaf`."""

  def __init__(self, name: str, modules: Sequence[tuple[str, str]], ignore: str = r"(?!)"):
    self.name = name
    self._modules = [(re.compile(p), t) for p, t in modules]
    self._ignore = re.compile(ignore)

  def torch_module(self, module: str) -> str | None:
    for pattern, template in self._modules:
      match = pattern.fullmatch(module)
      if match:
        return match.expand(template)
    return None

  def rule(self, path: str, shape: tuple[int, ...]) -> Rule | None:
    collection, rest = split_path(path)
    module, _, leaf = rest.rpartition("/")
    torch_module = self.torch_module(module)
    mapped = torch_leaf(collection, leaf, len(shape))
    if torch_module is None or mapped is None:
      return None
    torch_name, convert = mapped
    return Rule((f"{torch_module}.{torch_name}",), convert)

  def ignored(self, source: str) -> bool:
    return bool(self._ignore.fullmatch(source))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> `{'/'-joined path: leaf}` (the paths `jtl.masks.leaf_paths` gives)."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, path))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`{'a/b/c': leaf}` -> `{'a': {'b': {'c': leaf}}}`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree
