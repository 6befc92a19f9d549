"""Export a run's weights as a jtl-named .npz, with LoRA adapters merged into their kernels.

  python -m experiments.export --workdir=runs/ft_lora [--step=N] --out=merged.npz

Reads the run's `config.json` and checkpoint (the newest, or `--step`), folds every adapter into its
kernel (`jtl.lora.merge`: W_0 + s A B), and writes `params/...` and `model_state/...` arrays with
`jtl.pretrained.save_npz`. The file loads into the plain model (the same `model` section, no `lora`)
through `init_from.path`, which then computes what the adapted model computed. A run without adapters
is exported as it is. Bad input (no run there, no such step, an `--out` not ending in .npz) is one
`error:` line and writes nothing.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

from absl import flags, logging

from experiments import cli
from jtl import checkpoint, lora, pretrained
from jtl import config as config_lib
from jtl.errors import ConfigError


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("workdir", None, "The training run's workdir.", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "Export this checkpoint step (default: the newest).",
                       flag_values=flag_values)
  flags.DEFINE_string("out", None, "The .npz file to write.", flag_values=flag_values)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=flag_values)


def merged_variables(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, {'params': merged params, 'model_state': ...}) of a run's checkpoint, as host arrays."""
  workdir = config_lib.resolve_path(os.fspath(workdir))
  config = config_lib.load_run_config(workdir)
  if config is None:
    raise ConfigError(f"{workdir} holds no config.json (no run was started there); fix --workdir")
  step, variables = checkpoint.load_variables(workdir, step)
  params = variables["params"]
  if lora.enabled(config):
    params = lora.merge(params, config.lora)
  return step, {"params": params, "model_state": variables["model_state"]}


def _check_out(out: str, given: str) -> None:
  """ConfigError unless `out` (resolved) names a new or existing .npz file in a writable folder."""
  if os.path.isdir(out):
    raise ConfigError(f"--out={given} is an existing folder; name a file, e.g. "
                      f"--out={os.path.join(given, 'weights.npz')}")
  if not out.endswith(".npz"):
    raise ConfigError(f"--out={given} must end in .npz; fix --out")
  folder = os.path.dirname(out)
  if not os.path.isdir(folder):
    raise ConfigError(f"the folder of --out={out} does not exist; create it or fix --out")
  if not os.access(folder, os.W_OK):
    raise ConfigError(f"cannot write into {folder} (permission denied); choose a writable --out")


def write_atomically(variables: dict[str, Any], out: str) -> None:
  """`pretrained.save_npz` to a temporary file beside `out`, renamed onto it once complete: a write
  that fails (a read-only or special file system, a full disk) leaves nothing behind but a
  one-line ConfigError."""
  tmp = f"{out}.tmp-{os.getpid()}.npz"
  try:
    pretrained.save_npz(variables, tmp)
    os.replace(tmp, out)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise ConfigError(f"cannot write --out={out} ({e.strerror or type(e).__name__}); choose a "
                      "writable --out on a regular file system") from e


def main(flag_values: flags.FlagValues) -> None:
  out = config_lib.resolve_path(flag_values.out)
  _check_out(out, flag_values.out)
  step, variables = merged_variables(flag_values.workdir, flag_values.step)
  write_atomically(variables, out)
  logging.info("wrote %s (step %d of %s)", out, step, flag_values.workdir)


if __name__ == "__main__":
  cli.run(define_flags, main)
