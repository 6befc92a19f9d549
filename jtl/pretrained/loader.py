"""`load_pretrained`: a weight file -> jtl variables for a given model, with a report.

The model's abstract variables drive the matching (see `naming`): every jtl leaf is loaded (found,
converted, same shape), missing (the file lacks its source tensor) or mismatched (the shapes differ
after conversion, and a pos_embed could not be resized); file tensors no leaf used are unexpected.
Only loaded leaves are returned; the caller decides what to do with the rest (`merge_into` a fresh
init, like `jtl.checkpoint.transfer_init` with `dont_load`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jtl.errors import ConfigError
from jtl.pretrained import files, resnet, vit
from jtl.pretrained.naming import Convention, JtlNames, flatten, unflatten

NAMINGS = ("jtl", "big_vision")
_KNOWN = ("jtl paths (params/backbone/...), torchvision ResNet (conv1.weight, layer1.0...), "
          "timm ViT (patch_embed.proj.weight, blocks.0...), vit_jax/big_vision ViT "
          "(embedding/kernel, Transformer/...)")


def split_variables(variables: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
  """(params, model_state) of `model.init`'s output (`{'params', 'batch_stats'?}`) or of a
  `{'params', 'model_state'}` dict; model_state is `{'batch_stats': ...}` or empty."""
  if "params" not in variables:
    raise ConfigError(f"variables need a 'params' entry, got keys {list(variables)}; pass "
                      "jax.eval_shape(model.init, ...) or {'params': ..., 'model_state': ...}")
  if "model_state" in variables:
    return variables["params"], variables["model_state"]
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def detect_convention(tensors: Mapping[str, np.ndarray], path: str) -> Convention:
  """The naming convention of a file, from its tensor names."""
  if JtlNames.claims(tensors):
    return JtlNames()
  for convention_for in (vit.convention_for, resnet.convention_for):
    convention = convention_for(tensors)
    if convention is not None:
      return convention
  examples = ", ".join(list(tensors)[:3])
  raise ConfigError(f"cannot tell which naming {path} uses (its {len(tensors)} tensors start "
                    f"{examples}); jtl reads {_KNOWN}")


def _strip_wrapper(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  # torch.nn.DataParallel / DistributedDataParallel save every name under `module.`.
  if tensors and all(k.startswith("module.") for k in tensors):
    return {k[len("module."):]: v for k, v in tensors.items()}, ["stripped the 'module.' prefix"]
  return tensors, []


def load_pretrained(path: str | os.PathLike, *, abstract_variables: Mapping[str, Any],
                    format: str = "auto") -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads `path` into `({'params': ..., 'model_state': ...}, report)` for one jtl model.

  Args:
    path: a .pt/.pth/.bin (PyTorch, read without torch), .safetensors or .npz file.
    abstract_variables: `jax.eval_shape(model.init, ...)`'s output (or real variables): the paths,
      shapes and dtypes to fill.
    format: "auto" (by suffix), "torch", "safetensors" or "npz".

  Returns:
    Nested dicts of NumPy arrays (jtl paths, the model's dtypes) holding the loaded leaves only,
    and a report: `convention`, `loaded`, `missing`, `mismatched`, `unexpected`, `notes` (lists of
    strings naming jtl paths `<-` file names). Raises ConfigError for a bad path or format, an
    unreadable file, an unknown naming, or a file of which no tensor fits the model's backbone.
  """
  path = os.fspath(path)
  tensors, notes = _strip_wrapper(files.read_tensors(path, format))
  convention = detect_convention(tensors, path)
  params, model_state = split_variables(abstract_variables)
  targets = {**flatten(params, "params"), **flatten(model_state, "model_state")}
  has_class_token = "params/backbone/cls_token" in targets
  report: dict[str, Any] = {"convention": convention.name, "loaded": [], "missing": [],
                            "mismatched": [], "unexpected": [], "notes": notes}
  loaded, used = {}, set()
  for jtl_path, leaf in targets.items():
    shape = tuple(leaf.shape)
    rule = convention.rule(jtl_path, shape)
    if rule is None:
      report["missing"].append(f"{jtl_path} (no {convention.name} name)")
      continue
    names = ", ".join(rule.sources)
    if any(name not in tensors for name in rule.sources):
      report["missing"].append(f"{jtl_path} <- {names}")
      continue
    used.update(rule.sources)
    sources = [tensors[name] for name in rule.sources]
    try:
      value = np.asarray(rule.convert(*sources))
    except (ValueError, IndexError):  # e.g. a qkv matrix that does not split into these heads
      value = None
    if value is not None and value.shape != shape and jtl_path == "params/backbone/pos_embed":
      value, note = vit.adapt_pos_embed(value, shape, has_class_token)
      if note:
        report["notes"].append(note)
    if value is None or value.shape != shape:
      file_shapes = " ".join(str(tuple(s.shape)) for s in sources)
      report["mismatched"].append(f"{jtl_path} {shape} <- {names} {file_shapes}")
      continue
    # C order: transposed views would surprise writers that dump raw buffers (safetensors 0.8's
    # numpy save_file writes a transposed array's memory order, silently).
    loaded[jtl_path] = np.ascontiguousarray(value, dtype=leaf.dtype)
    report["loaded"].append(f"{jtl_path} <- {names}")
  report["unexpected"] = [k for k in tensors if k not in used and not convention.ignored(k)]
  report["unexpected"] += convention.extra_unexpected()
  # A foreign file of which only a head fits is the wrong file (jtl's own files may hold any tree).
  if convention.name != "jtl" and not any(p.startswith("params/backbone/") for p in loaded):
    needed = (report["missing"] + report["mismatched"] + ["?"])[0]
    raise ConfigError(f"no tensor of {path} ({convention.name} names) fits this model's backbone "
                      f"(it needs e.g. {needed}); check that the model config matches the file")
  tree = unflatten(loaded)
  return {"params": tree.get("params", {}), "model_state": tree.get("model_state", {})}, report


def _overlay(fresh: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for key, value in fresh.items():
    if key not in loaded:
      out[key] = value
    elif isinstance(value, Mapping):
      out[key] = _overlay(value, loaded[key])
    else:
      out[key] = loaded[key]
  return out


def merge_into(fresh: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
  """`fresh` variables (either layout of `split_variables`, same layout back) with every leaf that
  `loaded` (from `load_pretrained`) holds replaced: the missing/mismatched ones stay fresh."""
  params, model_state = split_variables(fresh)
  merged_params = _overlay(params, loaded.get("params", {}))
  merged_state = _overlay(model_state, loaded.get("model_state", {}))
  if "model_state" in fresh:
    return {"params": merged_params, "model_state": merged_state}
  return {"params": merged_params, **merged_state}


def format_report(report: Mapping[str, Any], path: str | os.PathLike) -> str:
  """One log line for a `load_pretrained` report (counts, then the names that need a look)."""
  parts = [f"pretrained {os.fspath(path)} ({report['convention']} names): "
           f"loaded {len(report['loaded'])}"]
  for key in ("missing", "mismatched", "unexpected"):
    parts.append(f"{key} {len(report[key])} {report[key]}" if report[key] else f"{key} 0")
  return ", ".join(parts) + "".join(f"; {note}" for note in report["notes"])


def save_npz(variables: Mapping[str, Any], path: str | os.PathLike, *, naming: str = "jtl") -> None:
  """Writes jtl variables (either layout of `split_variables`) to an .npz file.

  naming="jtl": `params/...` and `model_state/batch_stats/...` paths (loads back by identity).
  naming="big_vision": a ViT's params under big_vision names (`vit.to_big_vision`), readable by
  big_vision/timm loaders.
  """
  if naming not in NAMINGS:
    raise ConfigError(f"unknown npz naming {naming!r}; choose one of: {', '.join(NAMINGS)}")
  params, model_state = split_variables(variables)
  if naming == "big_vision":
    if flatten(model_state):
      raise ConfigError("naming='big_vision' saves ViT params only, but these variables have a "
                        "model_state (BatchNorm); use naming='jtl'")
    tensors = vit.to_big_vision(params)
  else:
    tensors = {**flatten(params, "params"), **flatten(model_state, "model_state")}
  files.write_npz({k: np.asarray(v) for k, v in tensors.items()}, path)
