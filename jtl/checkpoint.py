"""Orbax checkpoints: the manager, resume, restoring for evaluation, and transfer initialisation.

Layout: `WORKDIR/checkpoints/<step>/{params,model_state,opt_state}`. Orbax writes each step to a
temporary folder and renames it only once complete, and `all_steps()` lists completed steps only, so a
reader (the evaluator watching a running job) never sees a half-written checkpoint. Items with no
leaves (e.g. no BatchNorm → empty model_state) are not written.

**Checksums.** orbax and tensorstore check structure, not content: a flipped byte loads as a finite,
wrong weight. So every checkpoint of an asynchronous manager carries `checksums.json`, the size and
CRC-32 of every file of its items, written by orbax's `post_finalization_callback`: after every
process's data is on disk and before the commit (on a local disk: the temporary folder renamed to
`<step>`; on `gs://`, where orbax writes into `<step>` directly: its `commit_success.txt`), so a
committed checkpoint always has its manifest. (A synchronous manager has no such hook: it writes the
manifest right after the commit.) `restore` and `load_variables` check it before reading anything
(`ChecksumError`); a checkpoint without a manifest (written with `checkpoint_checksums=False`, or by an
older jtl) is read unverified.
"""
from __future__ import annotations

import json
import re
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jtl import masks, remote
from jtl.errors import ConfigError

ITEMS = ("params", "model_state", "opt_state")
MANIFEST = "checksums.json"
_NOT_DATA = ("commit_success.txt",)  # written by orbax after the commit on some file systems
_CHUNK = 16 << 20


class ChecksumError(ValueError):
  """A checkpoint's files do not match its manifest (damaged after it was written)."""


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def _item_files(folder: epath.Path) -> dict[str, epath.Path]:
  """{path relative to the step folder: path} of every data file of a step's items."""
  return {rel: folder / rel for rel in sorted(remote.file_sizes(folder))
          if "/" in rel and rel.split("/", 1)[0] in ITEMS
          and rel.rsplit("/", 1)[-1] not in _NOT_DATA}


def _crc32(path: epath.Path) -> tuple[int, int]:
  """(size, CRC-32) of a file, read in chunks."""
  crc, size = 0, 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc, size = zlib.crc32(chunk, crc), size + len(chunk)
  return size, crc


def write_manifest(folder: epath.Path) -> None:
  """Writes `folder/checksums.json`: {relative path: [size, crc32]} for every item file."""
  files = {rel: list(_crc32(path)) for rel, path in sorted(_item_files(folder).items())}
  (folder / MANIFEST).write_text(json.dumps({"crc32": files}))


def has_manifest(workdir: str | epath.Path, step: int) -> bool:
  return (checkpoint_dir(workdir) / str(step) / MANIFEST).exists()


def checksum_problem(workdir: str | epath.Path, step: int) -> str | None:
  """Why checkpoint `step`'s files do not match its manifest, or None (also None without one).

  Every process checks every file: what it reads is a subset (a multi-host restore reads shards
  written by other processes)."""
  folder = checkpoint_dir(workdir) / str(step)
  try:
    manifest = json.loads((folder / MANIFEST).read_text())["crc32"]
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError) as e:
    return f"its {MANIFEST} is unreadable ({type(e).__name__})"
  present = _item_files(folder)
  for rel, (size, crc) in manifest.items():
    if rel not in present:
      return f"{rel} is missing (listed in {MANIFEST})"
    if _crc32(present[rel]) != (size, crc):
      return f"{rel} does not match its checksum in {MANIFEST}"
  extra = sorted(set(present) - set(manifest))
  if extra:
    return f"{extra[0]} is not in {MANIFEST}"
  return None


def _commits_in_place(directory: epath.Path) -> bool:
  """Whether orbax writes a step straight into its final folder and commits it with a
  `commit_success.txt` (its choice for `gs://`, which has no atomic rename) rather than renaming a
  temporary folder."""
  return (ocp.path.atomicity_defaults.get_default_temporary_path_class(directory)
          is ocp.path.atomicity.CommitFileTemporaryPath)


class _Manager(ocp.CheckpointManager):
  """A CheckpointManager that writes each checkpoint's checksum manifest (see the module docstring)."""

  def __init__(self, directory: epath.Path, options: ocp.CheckpointManagerOptions, checksums: bool):
    self.checksums, self.saving_step = checksums, None
    super().__init__(directory, options=options)

  def before_commit(self) -> None:
    """orbax's post_finalization_callback: all data written, the checkpoint not yet committed."""
    if not self.checksums or self.saving_step is None:
      return
    if _commits_in_place(self.directory):  # GCS: the data is in `<step>/` already; the commit is
      folders = [self.directory / str(self.saving_step)]  # its commit_success.txt, written next
    else:  # a local disk: `<step>.orbax-checkpoint-tmp-*`, renamed to `<step>` next
      prefix = f"{self.saving_step}{ocp.path.atomicity.TMP_DIR_SUFFIX}"
      folders = [p for p in self.directory.iterdir() if p.name.startswith(prefix)]
    if len(folders) == 1:  # (anything else: no manifest, and the checkpoint is read unverified)
      write_manifest(folders[0])

  def save(self, step: int, *args, **kwargs) -> bool:
    self.saving_step = step
    saved = super().save(step, *args, **kwargs)
    if saved and self.checksums and not self._options.enable_async_checkpointing:
      folder = self.directory / str(step)  # a synchronous save has committed already
      if jax.process_index() == 0 and not (folder / MANIFEST).exists():
        write_manifest(folder)
    return saved


def manager(workdir: str | epath.Path, *, keep: int | None = 3, save_every: int = 1,
            async_save: bool = True, create: bool = True, cleanup_tmp: bool = False,
            checksums: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager over `WORKDIR/checkpoints`; `save(step, force=True)` ignores `save_every`.

  `keep=None`: orbax deletes nothing (the trainer's keep policy is `jtl.keep`). `cleanup_tmp`: remove
  half-written temporary folders that a killed run left (only the trainer, which owns them).
  `checksums`: each saved checkpoint gets its manifest (`checkpoint_checksums`).
  """
  holder: list[_Manager] = []
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save,
      create=create, cleanup_tmp_directories=cleanup_tmp,
      async_options=ocp.AsyncOptions(post_finalization_callback=lambda: holder[0].before_commit())
      if async_save else None)  # (orbax refuses the callback on a synchronous manager)
  holder.append(_Manager(checkpoint_dir(workdir), options, checksums))
  return holder[0]


def save(mgr: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
  """Saves the non-empty items of a TrainState (asynchronously if the manager is async)."""
  items = {name: ocp.args.StandardSave(getattr(state, name)) for name in ITEMS
           if jax.tree.leaves(getattr(state, name))}
  return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mgr: ocp.CheckpointManager, step: int, abstract: dict[str, Any],
            verify: bool = True) -> dict[str, Any]:
  """Restores the named items onto the shardings of their abstract (ShapeDtypeStruct) targets;
  `verify`: first checks the files against the checkpoint's manifest (ChecksumError if damaged)."""
  if verify:
    why = checksum_problem(mgr.directory.parent, step)
    if why:
      raise ChecksumError(f"checkpoint {step}: {why}")
  args, restored = {}, {}
  for name, target in abstract.items():
    if jax.tree.leaves(target):
      args[name] = ocp.args.StandardRestore(target)
    else:
      restored[name] = target
  if args:
    out = mgr.restore(step, args=ocp.args.Composite(**args))
    for name, target in abstract.items():
      if name in args:  # keep the target's exact pytree types (namedtuples in optax states)
        restored[name] = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(out[name]))
  return restored


def completed_steps(workdir: str | epath.Path) -> list[int]:
  """Steps whose checkpoint is fully written (a fresh look at the directory each call)."""
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return []
  return sorted(ocp.path.step.checkpoint_steps(directory))  # finalized steps only


def load_variables(workdir: str | epath.Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, {'params': ..., 'model_state': ...}) as host numpy trees, without knowing the structure."""
  steps = completed_steps(workdir)
  if not steps:
    raise ConfigError(f"no checkpoint in {checkpoint_dir(workdir)}; train there first or fix "
                      "init_from.workdir")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ConfigError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; available: {steps}")
  why = checksum_problem(workdir, step)
  if why:
    raise ConfigError(f"checkpoint {step} in {checkpoint_dir(workdir)} is damaged: {why}; pick "
                      "another step (init_from.step)")
  present = [n for n in ("params", "model_state") if (checkpoint_dir(workdir) / str(step) / n).exists()]
  # Onto one local device: the saving run's topology (8 devices, 2 hosts) need not exist here.
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with manager(workdir, keep=None, async_save=False, create=False) as reader:
    out = reader.restore(step, args=ocp.args.Composite(
        **{n: ocp.args.StandardRestore(fallback_sharding=one_device) for n in present}))
  return step, {n: jax.tree.map(np.asarray, out[n]) if n in present else {}
                for n in ("params", "model_state")}


def _transfer_source(params: Any, model_state: Any, init_from: ml_collections.ConfigDict
                     ) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """(what it is, {'params', 'model_state'} host trees, a pretrained file's report or {})."""
  if init_from.get("path") and init_from.get("workdir"):
    raise ConfigError("init_from has both a workdir and a path; set one of --config.init_from.workdir "
                      "and --config.init_from.path")
  if init_from.get("path"):
    from jtl import pretrained  # pylint: disable=g-import-not-at-top  (only when used)
    loaded, report = pretrained.load_pretrained(
        init_from.path, abstract_variables={"params": params, "model_state": model_state},
        format=init_from.get("format") or "auto")
    logging.info("%s", pretrained.format_report(report, init_from.path))
    return init_from.path, loaded, report
  step, source = load_variables(init_from.workdir, init_from.get("step"))
  return f"{init_from.workdir} step {step}", source, {}


def transfer_init(params: Any, model_state: Any, init_from: ml_collections.ConfigDict, *,
                  fix: str | None = None) -> tuple[Any, Any, str]:
  """Merges another run's checkpoint (`init_from.workdir`) or a weights file (`init_from.path`) into a
  fresh init: returns (params, model_state, report).

  Every fresh leaf is either loaded (same path and shape in the source) or re-initialised (its path
  matches a `dont_load` regex). Anything else — a shape mismatch, or a leaf missing from the source —
  is a ConfigError naming the paths. Source leaves the model lacks are reported as unexpected and
  ignored.

  `remap` loads a leaf from another source path, before `dont_load` is consulted: rows
  `(target regex, source path template[, indices])`, first match wins; the template may use the
  regex's groups (`\\1`), and `indices` picks entries along the last axis (a head's output units):
  e.g. `("params/head/(kernel|bias)", r"params/heads/printed/\\1", (5, 6, 7, 8, 9))` starts a
  5-way head from classes 5–9 of a 10-way source head.

  `fix`: the advice of the error for shapes that do not fit (default: re-initialise them with
  `init_from.dont_load`).
  """
  origin, source, file_report = _transfer_source(params, model_state, init_from)
  dont_load = [re.compile(p) for p in init_from.get("dont_load", ())]
  remap = _remap_rules(init_from.get("remap", ()))
  report = {"loaded": [], "reinitialised": [], "missing": [], "mismatched": [], "unexpected": []}
  merged, used, taken, bad_remaps = {}, set(), set(), []
  flat_sources = {name: dict(zip(masks.leaf_paths(source[name], name), jax.tree.leaves(source[name])))
                  for name in ("params", "model_state")}
  all_sources = {**flat_sources["params"], **flat_sources["model_state"]}
  for name, fresh in (("params", params), ("model_state", model_state)):
    src = flat_sources[name]
    leaves = []
    for path, leaf in zip(masks.leaf_paths(fresh, name), jax.tree.leaves(fresh)):
      rule = next((i for i, (pattern, _, _) in enumerate(remap) if pattern.fullmatch(path)), None)
      if rule is not None:
        used.add(rule)
        value, source_path, why = _remapped(path, remap[rule], all_sources)
        taken.add(source_path)
        if why:
          bad_remaps.append(f"{path} ← {why}")
        elif tuple(value.shape) != tuple(leaf.shape):
          report["mismatched"].append(f"{path} {tuple(value.shape)}→{tuple(leaf.shape)}")
        else:
          report["loaded"].append(path)
          leaves.append(np.asarray(value, dtype=leaf.dtype))
      elif any(r.fullmatch(path) for r in dont_load):
        report["reinitialised"].append(path)
        leaves.append(leaf)
      elif path not in src:
        report["missing"].append(path)
      elif tuple(src[path].shape) != tuple(leaf.shape):
        report["mismatched"].append(f"{path} {tuple(src[path].shape)}→{tuple(leaf.shape)}")
      else:
        report["loaded"].append(path)
        leaves.append(np.asarray(src[path], dtype=leaf.dtype))  # a dont_load leaf stays as given
    fresh_paths = set(masks.leaf_paths(fresh, name))
    report["unexpected"] += [p for p in src if p not in fresh_paths and p not in taken]
    merged[name] = leaves
  if bad_remaps:
    raise ConfigError(f"cannot load {origin}: init_from.remap: {', '.join(bad_remaps)}; fix "
                      "--config.init_from.remap")
  problems = []
  if report["mismatched"]:
    problems.append("shape mismatch: " + ", ".join(report["mismatched"]))
  if report["missing"]:
    problems.append("missing from checkpoint: " + ", ".join(report["missing"]))
  if problems:
    why = f" (the file: {'; '.join(file_report['mismatched'][:3])})" if file_report.get(
        "mismatched") else ""
    advice = fix or "add these paths to init_from.dont_load to re-initialise them"
    raise ConfigError(f"cannot load {origin}: {'; '.join(problems)}{why}; {advice}")
  all_paths = masks.leaf_paths(params, "params") + masks.leaf_paths(model_state, "model_state")
  for pattern in dont_load:
    if not any(pattern.fullmatch(p) for p in all_paths):
      raise ConfigError(f"init_from.dont_load pattern {pattern.pattern!r} matches no parameter; "
                        f"fix it (paths look like {all_paths[-1]!r})")
  for i, (pattern, _, _) in enumerate(remap):
    if i not in used:
      raise ConfigError(f"init_from.remap pattern {pattern.pattern!r} matches no parameter; "
                        f"fix it (paths look like {all_paths[-1]!r})")
  text = (f"transfer init from {origin}: loaded {len(report['loaded'])}, "
          f"re-initialised {len(report['reinitialised'])} {report['reinitialised']}, "
          f"unexpected (ignored) {len(report['unexpected'])} {report['unexpected']}")
  logging.info(text)
  return (jax.tree.unflatten(jax.tree.structure(params), merged["params"]),
          jax.tree.unflatten(jax.tree.structure(model_state), merged["model_state"]), text)


def load_whole(params: Any, model_state: Any, workdir: str, step: int | None, *, role: str,
               workdir_option: str, step_option: str, fix: str) -> tuple[Any, Any]:
  """Another run's checkpoint as every leaf of `params` and `model_state` (abstract trees: an entry
  an objective declared, e.g. a distillation teacher; `jtl.objectives.base.LoadedWeights`), through
  `transfer_init` with nothing re-initialised. A missing run or step, or shapes that do not fit, are
  one-line ConfigErrors that name the `role` and the config option to fix."""
  steps = completed_steps(workdir)
  if not steps:
    raise ConfigError(f"no {role} checkpoint in {workdir}; train the {role} there first or fix "
                      f"--config.{workdir_option}")
  if step is not None and step not in steps:
    raise ConfigError(f"no {role} checkpoint for step {step} in {workdir}; available: {steps} "
                      f"(--config.{step_option})")
  source = ml_collections.ConfigDict(dict(workdir=workdir, step=step))
  params, model_state, _ = transfer_init(params, model_state, source,
                                         fix=f"{fix} (the {role} is loaded whole)")
  return params, model_state


def _remap_rules(rows: Any) -> list[tuple[re.Pattern, str, tuple[int, ...] | None]]:
  """`init_from.remap` rows as (compiled target regex, source template, indices or None)."""
  rules = []
  for row in rows or ():
    if isinstance(row, str) or len(row) not in (2, 3):
      raise ConfigError(f"init_from.remap row {row!r} is not (target regex, source path[, indices]); "
                        "fix --config.init_from.remap")
    indices = tuple(row[2]) if len(row) == 3 and row[2] is not None else None
    if indices is not None and not all(isinstance(i, int) for i in indices):
      raise ConfigError(f"init_from.remap indices {row[2]!r} must be integers (positions along the "
                        "last axis of the source leaf)")
    rules.append((re.compile(row[0]), row[1], indices))
  return rules


def _remapped(path: str, rule: tuple[re.Pattern, str, tuple[int, ...] | None],
              sources: dict[str, Any]) -> tuple[Any, str, str | None]:
  """(the value for `path` under one remap rule, its source path, None if it can be loaded, else why
  not)."""
  pattern, template, indices = rule
  source_path = pattern.fullmatch(path).expand(template)
  if source_path not in sources:
    return None, source_path, f"{source_path} (not in the source)"
  value = np.asarray(sources[source_path])
  if indices is not None:
    if value.ndim == 0 or not all(-value.shape[-1] <= i < value.shape[-1] for i in indices):
      return None, source_path, (f"{source_path}{list(indices)} (indices outside its last axis "
                                 f"{value.shape})")
    value = np.take(value, indices, axis=-1)
  return value, source_path, None


def fill_holes(loaded: tuple[Any, Any], fresh: tuple[Any, Any], shardings: Any) -> tuple[Any, Any]:
  """Completes `transfer_init` run on abstract shapes: loaded arrays are placed with their state
  shardings, and the re-initialised leaves (still ShapeDtypeStructs) come from the fresh init."""
  def pick(loaded_leaf, fresh_leaf, leaf_sharding):
    if isinstance(loaded_leaf, jax.ShapeDtypeStruct):
      return fresh_leaf
    return jax.device_put(loaded_leaf, leaf_sharding)
  return tuple(jax.tree.map(pick, l, f, sh) for l, f, sh in zip(
      loaded[:2], fresh, (shardings.params, shardings.model_state)))
