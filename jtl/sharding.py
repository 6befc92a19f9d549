"""Device mesh from config, sharding rules for the train state, and host-local → global batches.

Default: every device on one `data` axis, the batch split along it, the state replicated (plain data
parallelism, which is what runs unchanged on 1 CPU, 8 fake CPU devices, a GPU or a pod). The seam for
FSDP/tensor parallelism is `config.mesh.rules`: a rule table from state-leaf paths
(`params/...`, `opt_state/...`, `model_state/...`) to PartitionSpec tuples, e.g.

  config.mesh.axes = (('data', -1), ('fsdp', 4))
  config.mesh.rules = (('.*/kernel', ('fsdp', None)), ('.*', ()))

The batch is split over every mesh axis named in `config.mesh.batch_axes` (default: data and fsdp).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtl import masks
from jtl.errors import ConfigError


def default_mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      axes=(("data", -1),), rules=((".*", ()),), batch_axes=("data", "fsdp"),
      fsdp_axis="data", fsdp_min_size=2**12))


def make_mesh(cfg: ml_collections.ConfigDict, devices: list[Any] | None = None) -> Mesh:
  """A Mesh over all (or the given) devices; one axis size may be -1 (= whatever is left).

  Sizes that multiply to fewer devices than there are use the first ones (e.g. `(('data', 1),)`).
  """
  devices = devices if devices is not None else jax.devices()
  names = tuple(name for name, _ in cfg.axes)
  sizes = [int(size) for _, size in cfg.axes]
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh.axes {cfg.axes!r}: at most one axis may have size -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 not in sizes and known < len(devices):
    devices = devices[:known]  # an explicit smaller mesh (debugging, 1-vs-N comparisons)
  if len(devices) % known:
    raise ConfigError(f"mesh.axes {cfg.axes!r} does not divide {len(devices)} devices; fix the sizes")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ConfigError(f"mesh.axes {cfg.axes!r} uses {int(np.prod(sizes))} of {len(devices)} devices;"
                      " make the sizes multiply to the device count (or use -1)")
  try:
    device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, names)


def batch_spec(mesh: Mesh, batch_axes: Iterable[str] = ("data", "fsdp")) -> PartitionSpec:
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  return PartitionSpec(axes if axes else None)


def batch_size_divisor(mesh: Mesh, batch_axes: Iterable[str] = ("data", "fsdp")) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes if a in mesh.axis_names]))


def fsdp_spec(shape: tuple[int, ...], axis: str, axis_size: int, min_size: int) -> tuple:
  """Shard the largest dimension divisible by the axis size, for leaves of at least `min_size`
  elements (smaller ones, and those with no divisible dimension, stay replicated)."""
  if int(np.prod(shape)) < min_size or axis_size == 1:
    return ()
  divisible = [i for i, d in enumerate(shape) if d % axis_size == 0]
  if not divisible:
    return ()
  dim = max(divisible, key=lambda i: (shape[i], -i))
  return tuple(axis if i == dim else None for i in range(len(shape)))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Any,
                    cfg: ml_collections.ConfigDict | None = None) -> Any:
  """NamedSharding for every leaf of a (abstract) state, from the `(pattern, spec)` rule table.

  A spec is a PartitionSpec tuple, or `"fsdp"`: params and optimizer state sharded over the
  `fsdp_axis` (default the data axis, ZeRO-3 / FSDP style) along their largest divisible dimension,
  e.g. `config.mesh.rules = (('.*', 'fsdp'),)`.
  """
  cfg = cfg or default_mesh_config()
  specs = masks.match(abstract_state, rules, prefix="", default=(), what="mesh rule")
  fsdp_axis = cfg.get("fsdp_axis", "data")

  def to_sharding(path, leaf, spec):
    if isinstance(spec, str):
      if spec != "fsdp":
        raise ConfigError(f"mesh rule spec {spec!r} is not a PartitionSpec tuple or 'fsdp'; fix "
                          "config.mesh.rules")
      if fsdp_axis not in mesh.axis_names:
        raise ConfigError(f"mesh.fsdp_axis {fsdp_axis!r} is not a mesh axis {mesh.axis_names}; fix "
                          "config.mesh.fsdp_axis")
      spec = fsdp_spec(tuple(leaf.shape), fsdp_axis, mesh.shape[fsdp_axis],
                       int(cfg.get("fsdp_min_size", 2**12)))
    spec = tuple(spec)
    unknown = [a for entry in spec if entry is not None for a in np.atleast_1d(entry)
               if a not in mesh.axis_names]
    if unknown:
      raise ConfigError(f"mesh rule {spec} names axis {str(unknown[0])!r}, which the mesh lacks (its "
                        f"axes: {', '.join(mesh.axis_names)}); add it to config.mesh.axes (e.g. "
                        f"--config.mesh.axes=\"(('data',-1),('{unknown[0]}',2))\") or fix "
                        "config.mesh.rules")
    if len(spec) > len(leaf.shape):
      spec = ()  # scalars and vectors matched by a broad rule stay replicated
    for dim, axis in zip(leaf.shape, spec):
      if axis is not None and dim % int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)])):
        raise ConfigError(f"mesh rule {spec} cannot split a dimension of size {dim} of {path} "
                          f"(shape {leaf.shape}); change config.mesh.rules (a narrower pattern "
                          "before it, another dimension, or 'fsdp', which picks a dimension that "
                          "divides)")
    return NamedSharding(mesh, PartitionSpec(*spec))
  is_leaf = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
  leaves, treedef = jax.tree.flatten(abstract_state, is_leaf=is_leaf)
  paths = masks.leaf_paths(abstract_state, "")
  spec_leaves = treedef.flatten_up_to(specs)
  return jax.tree.unflatten(treedef, [to_sharding(p, leaf, spec) for p, leaf, spec
                                      in zip(paths, leaves, spec_leaves)])


def to_global(local_batch: Any, sharding: NamedSharding) -> Any:
  """Host-local numpy batch (this process's rows) → global jax.Arrays sharded along the batch."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def prefetch_to_mesh(iterator: Iterator[Any], sharding: NamedSharding, size: int = 2) -> Iterator[Any]:
  """Moves the next `size` batches onto devices in a background thread while the step runs.

  Closing the returned generator (or dropping it) stops the thread and closes `iterator`: a run that
  ends before its data does (every run: training data repeats) leaves no thread behind holding a
  data pipeline and its buffers."""
  buffer: queue.Queue = queue.Queue(maxsize=size)
  done, stop = object(), threading.Event()

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def producer():
    try:
      for batch in iterator:
        if not put(to_global(batch, sharding)):
          return
      put(done)
    except Exception as e:  # surfaced in the consumer, not lost in the thread
      put(e)
    finally:
      close = getattr(iterator, "close", None)
      if close is not None:
        close()

  thread = threading.Thread(target=producer, daemon=True, name="prefetch_to_mesh")
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is done:
        return
      if isinstance(item, Exception):
        raise item
      yield item
  finally:
    stop.set()
    thread.join(timeout=60)  # (a source stalled inside next() is left behind, not waited for)
