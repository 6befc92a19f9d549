"""Pictures drawn from a finished run's checkpoints (`after_training`, which `experiments.train`
calls when a run ends): style transfer's image at every checkpoint, AdaIN's content x style grid.
Storage and plotting code, kept out of the objectives (which never touch storage).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from jtl import checkpoint
from jtl import config as config_lib
from jtl.objectives import adain as adain_objective
from jtl.objectives import style


def after_training(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """The picture of the run's objective, if it has one (`PICTURES`); returns its path."""
  draw = PICTURES.get(config.get("objective", "supervised"))
  return draw(config, workdir) if draw is not None else None


def style_transfer(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Writes `<workdir>/plots/style_transfer.png`: content, style and the image at every checkpoint
  (denormalised, nearest-neighbour pixels); returns its path, None if the run has no checkpoint."""
  from jtl.data import single_image  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from jtl import plots  # pylint: disable=g-import-not-at-top  (matplotlib, Agg)
  plt = plots.plt
  workdir = config_lib.resolve_path(str(workdir))
  steps = checkpoint.completed_steps(workdir)
  if not steps:
    return None
  o = config_lib.section_options(config, "style", style.default_config())
  shape = style.data_shape(config.data)
  panels = [(single_image.load(o[key], config.data, shape)) for key in ("content", "style")]
  panels = [(image, f"{key}\n{caption}") for key, (image, caption) in zip(("content", "style"),
                                                                          panels)]
  for step in steps:
    _, variables = checkpoint.load_variables(workdir, step)
    panels.append((variables["params"]["image"][0], f"step {step}"))
  normalize = config.data.get("normalize", "unit")
  fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels), 2.0), dpi=100)
  for ax, (image, title) in zip(np.atleast_1d(axes), panels):
    shown = single_image.denormalize(image, normalize)
    grey = shown.shape[-1] == 1
    ax.imshow(shown[..., 0] if grey else shown, cmap="gray" if grey else None, vmin=0.0, vmax=1.0,
              interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()
  path = plots.save(fig, epath.Path(workdir) / "plots" / "style_transfer.png")
  logging.info("wrote %s", path)
  return str(path)


def adain(config: ml_collections.ConfigDict, workdir: str, count: int = 4) -> str | None:
  """Writes `<workdir>/plots/adain.png` from the newest checkpoint: the first `count` content images
  (rows) in the style of the first `count` style images (columns), one decoder pass each; returns
  its path, None without a checkpoint."""
  from jtl.data import single_image  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from jtl import plots  # pylint: disable=g-import-not-at-top  (matplotlib, Agg)
  plt = plots.plt
  workdir = config_lib.resolve_path(str(workdir))
  if not checkpoint.completed_steps(workdir):
    return None
  step, variables = checkpoint.load_variables(workdir)
  objective = adain_objective.AdaIN.from_config(config)
  names = {role: config.data.mixture[role].get("name", config.data.name)
           for role in ("content", "style")}
  images = {role: jnp.stack([jnp.asarray(single_image.load(f"{names[role]}@{i}", config.data,
                                                           objective.image_shape)[0])
                             for i in range(count)]) for role in names}
  params = jax.tree.map(jnp.asarray, variables["params"])
  state = jax.tree.map(jnp.asarray, variables["model_state"])
  content = jnp.repeat(images["content"], count, axis=0)  # row-major: content i, style j
  style = jnp.tile(images["style"], (count, 1, 1, 1))
  result, _ = jax.jit(objective.stylise)(params, state, content, style)
  normalize = config.data.get("normalize", "unit")
  fig, axes = plt.subplots(count + 1, count + 1, figsize=(1.3 * (count + 1), 1.3 * (count + 1)))
  cells = {(0, j + 1): images["style"][j] for j in range(count)}
  cells.update({(i + 1, 0): images["content"][i] for i in range(count)})
  cells.update({(i + 1, j + 1): result[i * count + j] for i in range(count) for j in range(count)})
  for (r, k), ax in ((rk, axes[rk]) for rk in np.ndindex(count + 1, count + 1)):
    ax.set_axis_off()
    if (r, k) in cells:
      shown = single_image.denormalize(np.asarray(cells[r, k]), normalize)
      ax.imshow(shown[..., 0] if shown.shape[-1] == 1 else shown, cmap="gray", vmin=0.0, vmax=1.0,
                interpolation="nearest")
  axes[0, 0].set_title(f"step {step}", fontsize=7)
  path = plots.save(fig, epath.Path(workdir) / "plots" / "adain.png")
  return str(path)


PICTURES: dict[str, Callable[[ml_collections.ConfigDict, str], str | None]] = {
    "style": style_transfer, "adain": adain}
