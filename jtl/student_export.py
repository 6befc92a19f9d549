"""A distillation run's student as a supervised run of its own (`export_student`): storage code, kept
beside the checkpoints and out of the objective (jtl/objectives/distill.py never touches storage).

  python -c "from jtl.student_export import export_student; export_student('runs/kd', 'runs/student')"
  python -m experiments.evaluate --workdir=runs/student
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from jtl import checkpoint
from jtl import config as config_lib
from jtl.errors import ConfigError


def student_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A distillation run's config as the supervised run of its student alone: objective
  `supervised`, no `distill` section, everything trainable, and no `data.mixture` (the base `data`
  section, which the supervised objective reads, stays)."""
  plain = config_lib.as_plain(config)
  plain.pop("distill", None)
  plain["objective"] = "supervised"
  plain["trainable"] = [[".*", True]]
  plain["data"]["mixture"] = {}
  if plain.get("init_from"):
    plain["init_from"]["workdir"] = None
  return config_lib.from_plain(plain)


def export_student(workdir: str, export_workdir: str, step: int | None = None) -> int:
  """Writes the student of distillation run `workdir` (checkpoint `step`, default the latest) as a
  supervised run in `export_workdir`: `config.json` and `checkpoints/<step>/` with the student's
  params and model_state at the top level. Returns the step. Evaluate it with `python -m
  experiments.evaluate --workdir=EXPORT`, or transfer from it with `init_from.workdir=EXPORT`."""
  workdir = config_lib.resolve_path(str(workdir))
  export_workdir = config_lib.resolve_path(str(export_workdir))
  run = config_lib.load_run_config(workdir)
  if run is None or run.get("objective") != "distill":
    raise ConfigError(f"{workdir} is not a distillation run (no config.json with objective "
                      "'distill'); pass the distillation run's workdir")
  if checkpoint.completed_steps(export_workdir):
    raise ConfigError(f"{export_workdir} already holds checkpoints; choose an empty export dir")
  step, variables = checkpoint.load_variables(workdir, step)
  target = epath.Path(export_workdir)
  target.mkdir(parents=True, exist_ok=True)
  config_lib.run_config_path(target).write_text(student_config(run).to_json_best_effort(indent=2))
  state = types.SimpleNamespace(
      params=jax.tree.map(jnp.asarray, variables["params"]["student"]),
      model_state=jax.tree.map(jnp.asarray, dict(variables["model_state"].get("student", {}))),
      opt_state={})
  with checkpoint.manager(target, keep=None, async_save=False) as writer:
    checkpoint.save(writer, step, state, force=True)
  return step
