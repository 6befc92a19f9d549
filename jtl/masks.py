"""Pytree masks: rule tables over `/`-joined leaf paths.

A *rule table* is a sequence of `(pattern, value)` pairs. Each leaf's path (e.g.
`params/backbone/stage1_block0/conv1/kernel`) is matched with `re.fullmatch` against the patterns in
order; the first match gives the leaf its value. A pattern that matches no leaf at all is an error that
lists the nearest paths, because a silent typo in a freeze rule trains the wrong model.

On top of that: boolean trainable masks, label trees, `partition`/`merge` of a params pytree into its
trainable and frozen parts (nested dicts holding only the selected leaves, so an optimizer built on the
trainable part has no state for frozen leaves), and a per-module summary table.

Named presets: a `trainable` value (or a phase's rule table, jtl.phases) that is one of these names
stands for its rule table; any other string keeps its meaning of a bare pattern.
  "head_only"  the head (a linear probe): `params/head/.*`.
  "bitfit"     every bias and the head (Ben Zaken et al. 2022, BitFit): leaves named `bias`, which
               are the additive terms of Dense/Conv layers *and* of normalisation layers (BatchNorm
               and LayerNorm beta, the shift after normalising). Norm `scale` (gamma) multiplies,
               so it is not a bias and stays frozen; running statistics are not parameters. The
               norm shifts are needed: convolutions followed by BatchNorm carry no bias of their own
               (cnn_small, the ResNets), so without beta BitFit would train nothing below the head.
               A BatchNorm with a trainable beta is not frozen: in training it normalises with batch
               statistics and updates its running averages.
  "lora"       the LoRA adapters (`lora_a`/`lora_b`, jtl.lora) and the head; needs
               `config.lora.rank > 0`.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jtl.errors import ConfigError

PyTree = Any
Rules = Sequence[tuple[str, Any]]
_NO_DEFAULT = object()


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_paths(tree: PyTree, prefix: str = "params") -> list[str]:
  """The `/`-joined path of every leaf, in `jax.tree.leaves` order."""
  with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  parts = [prefix] if prefix else []
  return ["/".join(parts + [_key_name(k) for k in keys]) for keys, _ in with_paths]


def _nearby(pattern: str, paths: Sequence[str], n: int = 3) -> str:
  close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)
  return ", ".join(close) if close else "(the tree is empty)"


def compile_rules(rules: Rules | str, what: str = "rule") -> list[tuple[re.Pattern, Any]]:
  """Compiles a rule table; a bare string is shorthand for `[(string, True)]`."""
  if isinstance(rules, str):
    rules = [(rules, True)]
  compiled = []
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ConfigError(f"{what} {rule!r} is not a (pattern, value) pair; write rules as "
                        f"[('params/head/.*', True), ('.*', False)]")
    pattern, value = rule
    try:
      compiled.append((re.compile(pattern), value))
    except re.error as e:
      raise ConfigError(f"{what} pattern {pattern!r} is not a valid regex ({e}); fix the pattern") from e
  return compiled


def match(tree: PyTree, rules: Rules | str, *, prefix: str = "params", default: Any = _NO_DEFAULT,
          what: str = "rule") -> PyTree:
  """Label tree: each leaf gets the value of the first rule whose pattern fullmatches its path.

  Raises ConfigError if a pattern matches no leaf, or a leaf matches no rule and no default is given.
  """
  compiled = compile_rules(rules, what)
  paths = leaf_paths(tree, prefix)
  used = [False] * len(compiled)
  labels = []
  for path in paths:
    for i, (regex, value) in enumerate(compiled):
      if regex.fullmatch(path):
        used[i] = True
        labels.append(value)
        break
    else:
      if default is _NO_DEFAULT:
        raise ConfigError(f"no {what} matches {path!r}; add a catch-all rule such as ('.*', False)")
      labels.append(default)
  for (regex, _), was_used in zip(compiled, used):
    if not was_used:
      raise ConfigError(f"{what} pattern {regex.pattern!r} matches no parameter; nearby paths: "
                        f"{_nearby(regex.pattern, paths)}")
  return jax.tree.unflatten(jax.tree.structure(tree), labels)


PRESETS: dict[str, tuple[tuple[str, bool], ...]] = {
    "head_only": (("params/head/.*", True), (".*", False)),
    "bitfit": (("params/head/.*", True), (".*/bias", True), (".*", False)),
    "lora": (("params/head/.*", True), (".*/lora_[ab]", True), (".*", False)),
}


def preset_rules(rules: Rules | str, params: PyTree, prefix: str = "params") -> Rules | str:
  """The rule table of a preset name (see the module docstring); anything else unchanged."""
  if not isinstance(rules, str) or rules not in PRESETS:
    return rules
  if rules == "lora" and not any(p.endswith(("/lora_a", "/lora_b"))
                                 for p in leaf_paths(params, prefix)):
    raise ConfigError("trainable='lora' needs LoRA adapters, but the model has none; set "
                      "--config.lora.rank to a positive rank")
  return PRESETS[rules]


def trainable_mask(params: PyTree, rules: Rules | str, prefix: str = "params") -> PyTree:
  """Boolean tree, True where a leaf trains. A preset name (`PRESETS`) stands for its rule table; any
  other bare pattern means: that trains, nothing else does."""
  rules = preset_rules(rules, params, prefix)
  default = False if isinstance(rules, str) else _NO_DEFAULT
  try:
    mask = match(params, rules, prefix=prefix, default=default, what="trainable rule")
  except ConfigError as e:
    if not isinstance(rules, str):
      raise
    # A bare word that matches nothing was most likely meant as a preset: name them.
    raise ConfigError(
        f"trainable={rules!r} is neither a preset ({', '.join(PRESETS)}) nor a pattern that "
        f"matches a parameter ({str(e).split('; ', 1)[-1]}); pass a preset, e.g. "
        "--config.trainable=head_only, or a regex over parameter paths such as 'params/head/.*'"
        ) from e
  for leaf in jax.tree.leaves(mask):
    if not isinstance(leaf, (bool, np.bool_)):
      raise ConfigError(f"trainable rules must map to True/False, got {leaf!r}; fix config.trainable")
  return mask


def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
  if not isinstance(tree, dict):
    raise TypeError(f"partition/merge need nested dicts, got {type(tree).__name__}")
  return traverse_util.flatten_dict(tree, keep_empty_nodes=False)


def partition(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """Splits a nested-dict tree into (selected, rest); each holds only its own leaves."""
  flat, flat_mask = _flat(tree), _flat(mask)
  chosen = {k: v for k, v in flat.items() if flat_mask[k]}
  rest = {k: v for k, v in flat.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


def merge(*trees: PyTree) -> PyTree:
  """Inverse of `partition`: the union of disjoint nested-dict trees."""
  flat = {}
  for tree in trees:
    for key, value in _flat(tree).items():
      if key in flat:
        raise ValueError(f"merge: leaf {'/'.join(key)} is in more than one tree")
      flat[key] = value
  return traverse_util.unflatten_dict(flat)


def frozen_modules(mask: PyTree) -> frozenset[str]:
  """`/`-joined paths (no prefix) of modules all of whose direct leaves are frozen.

  This is what `jtl.models.layers.frozen_norms` takes: a BatchNorm in this set uses and keeps its
  running statistics.
  """
  by_module: dict[str, bool] = {}
  for key, trainable in _flat(mask).items():
    module = "/".join(key[:-1])
    by_module[module] = by_module.get(module, False) or bool(trainable)
  return frozenset(m for m, any_trainable in by_module.items() if not any_trainable)


def count(tree: PyTree) -> tuple[int, int]:
  """(number of scalars, bytes) over the leaves of a tree of arrays or ShapeDtypeStructs."""
  leaves = jax.tree.leaves(tree)
  return (sum(int(np.prod(x.shape)) for x in leaves),
          sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves))


def summary(params: PyTree, mask: PyTree, prefix: str = "params", depth: int = 3) -> str:
  """A table of trainable/frozen parameter counts and bytes per module (paths cut to `depth` parts)."""
  rows: dict[str, list[int]] = {}
  for path, leaf, trainable in zip(leaf_paths(params, prefix), jax.tree.leaves(params),
                                   jax.tree.leaves(mask)):
    module = "/".join(path.split("/")[:-1][:depth])
    n, nbytes = count(leaf)
    row = rows.setdefault(module, [0, 0, 0, 0])
    offset = 0 if trainable else 2
    row[offset] += n
    row[offset + 1] += nbytes
  total = [sum(r[i] for r in rows.values()) for i in range(4)]
  width = max([len(m) for m in rows] + [len("total")])
  lines = [f"{'module':<{width}}  {'trainable':>12} {'bytes':>10}  {'frozen':>12} {'bytes':>10}"]
  for module, r in list(rows.items()) + [("total", total)]:
    lines.append(f"{module:<{width}}  {r[0]:>12,} {_human(r[1]):>10}  {r[2]:>12,} {_human(r[3]):>10}")
  return "\n".join(lines)


def _human(nbytes: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if nbytes < 1024 or unit == "GiB":
      return f"{nbytes:.0f}{unit}" if unit == "B" else f"{nbytes:.1f}{unit}"
    nbytes /= 1024
  return str(nbytes)
