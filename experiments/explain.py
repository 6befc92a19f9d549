"""Grad-CAM or CAM maps for the first eval images of a trained run, as a PNG grid.

  python -m experiments.explain --workdir=/tmp/jtl/pretrain [--config=CONFIG.py[:ARGS]] [--step=N] \
      [--num=16] [--method=gradcam|cam] [--layer=backbone/stage3]

Reads the run's resolved config from WORKDIR/config.json unless --config is given, restores the
latest checkpoint (or --step), writes WORKDIR/plots/<method>_step<N>.png and prints its path. Bad
input stops with one `error:` line and exit status 2, before anything is written.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from etils import epath

from experiments import cli
from jtl import checkpoint, data, explain, objectives
from jtl import config as config_lib
from jtl.errors import ConfigError


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  """Registers this entry point's flags on `flag_values` (absl's FLAGS, or fresh ones in tests)."""
  cli.define_config_flag(flag_values, argv,
                         "Config file (path[:args]); default: the run's WORKDIR/config.json.")
  flags.DEFINE_string("workdir", None, "The training run's workdir.", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "Checkpoint step to explain (default: the latest).",
                       flag_values=flag_values)
  flags.DEFINE_integer("num", 16, "How many of the first eval-split images to explain.",
                       flag_values=flag_values)
  flags.DEFINE_enum("method", "gradcam", list(explain.METHODS), "Saliency method.",
                    flag_values=flag_values)
  flags.DEFINE_string("layer", None, "Module path of the feature map, e.g. backbone/stage3 "
                      "(default: the model's last feature map before pooling).",
                      flag_values=flag_values)
  flags.mark_flag_as_required("workdir", flag_values=flag_values)


def explain_run(flag_values: flags.FlagValues) -> epath.Path:
  """Validates everything, then computes the maps and writes the grid; returns the PNG's path."""
  workdir = epath.Path(config_lib.resolve_path(flag_values.workdir))
  if flag_values.num < 1:
    raise ConfigError(f"--num must be at least 1, got {flag_values.num}")
  config = cli.load_config(flag_values) or config_lib.load_run_config(workdir)
  if config is None:
    raise ConfigError(f"{workdir} holds no config.json; pass the run's config with --config=... or "
                      "fix --workdir")
  config = config_lib.prepare(config)
  model = getattr(objectives.build(config), "model", None)
  if not isinstance(model, nn.Module):
    raise ConfigError(f"objective {config.get('objective', 'supervised')!r} has no single model to "
                      "explain")
  make_batches, _ = data.eval_iterator(config.data, split=config.data.eval_split,
                                       global_batch_size=flag_values.num, process_index=0,
                                       process_count=1)
  batch = next(iter(make_batches()))
  _check_class_scores(model, config, batch["image"][:1])
  step, variables = checkpoint.load_variables(workdir, flag_values.step)
  real = batch["mask"] > 0  # a split smaller than --num is padded
  images = batch["image"][real]
  labels = batch["label"][real] if "label" in batch else None  # (unlabelled data: no "true" line)
  maps, predicted, _ = explain.explain(model, variables, images, method=flag_values.method,
                                       layer=flag_values.layer)
  # With data.labels the model's class i is the dataset's class labels[i]: title with the latter.
  kept = config.data.get("labels")
  class_names = [str(c) for c in kept] if kept else None
  path = workdir / "plots" / f"{flag_values.method}_step{step}.png"
  layer = flag_values.layer or explain.default_layer(model)
  title = f"{flag_values.method} at {layer}, step {step}"
  return explain.save_grid(images, np.asarray(maps), np.asarray(predicted), labels, path,
                           class_names, title=title)


def _check_class_scores(model: nn.Module, config: Any, image: np.ndarray) -> None:
  """ConfigError unless `model` maps images to class scores [B, classes] (a multitask model returns
  one output per task, a contrastive one embeddings: neither has a class to explain)."""
  objective = config.get("objective", "supervised")
  try:
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0],
                         jax.ShapeDtypeStruct(image.shape, np.float32))
  except Exception as e:  # a model that does not take one image batch at all (CLIP: image + text)
    raise ConfigError(f"objective {objective!r}: its model does not map images to class scores "
                      f"({type(e).__name__}); explain runs a classifier (e.g. a supervised run)"
                      ) from e
  if not (isinstance(out, jax.ShapeDtypeStruct) and out.ndim == 2 and out.shape[1] >= 2):
    got = jax.tree.map(lambda a: tuple(a.shape), out)
    raise ConfigError(f"objective {objective!r}: its model returns {got}, not class scores "
                      "[batch, classes]; explain runs a classifier (e.g. a supervised run's "
                      "--workdir)")


def main(flag_values: flags.FlagValues) -> None:
  print(explain_run(flag_values), flush=True)


if __name__ == "__main__":
  cli.run(define_flags, main)
