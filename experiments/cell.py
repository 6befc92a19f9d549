"""One cell of a sweep, in one process: train then evaluate, or fit a raw-pixel baseline.

  python -m experiments.cell --config=experiments/configs/transfer_digits.py:mode=scratch \
      --workdir=runs/t/scratch_s0 [--config.KEY=VALUE ...]
  python -m experiments.cell --kind=baseline --baseline=pixels_1nn \
      --config=experiments/configs/transfer_digits.py:shots=1 --workdir=runs/t/pixels-1nn_s0

`experiments.sweep` starts one of these per cell (its output goes to WORKDIR/log.txt). kind=train
runs exactly what `python -m experiments.train` and then `python -m experiments.evaluate
--workdir=WORKDIR` run (their own `main`s, one after the other in this process, so a cell pays the
start-up of TensorFlow and JAX once, not twice); a rerun resumes training from the newest checkpoint
and evaluates only what is not evaluated yet. kind=baseline fits `jtl.baselines.<baseline>` on the
config's labelled train examples and writes, like an evaluation, `config.json` and one row
`{"step": 0, "<eval split>/accuracy": ..., "<eval split>/num_examples": ...}` to
`eval_metrics.jsonl`, so the report shows it beside the trained runs.
"""
from jtl import signals

if __name__ == "__main__":
  signals.install()  # as experiments.train: a SIGTERM during start-up stops cleanly too
# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags

from experiments import cli
from experiments import train as train_cli


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  train_cli.define_flags(flag_values, argv)
  flags.DEFINE_enum("kind", "train", ["train", "baseline"], "train: train then evaluate; baseline: "
                    "fit --baseline on the config's data.", flag_values=flag_values)
  flags.DEFINE_string("baseline", None, "kind=baseline: which of jtl.baselines.NAMES.",
                      flag_values=flag_values)


def write_baseline(config, workdir: str, name: str) -> dict:
  """Fits baseline `name` on `config.data` and writes config.json and its eval_metrics.jsonl row:
  `<eval split>/accuracy` on the labels, or for a multitask config `<eval split>/<task>/accuracy` for
  each classification task (on the task's feature), as the multitask evaluator names them."""
  from etils import epath
  from jtl import baselines, data
  from jtl import config as config_lib
  from jtl.metric_writer import MetricWriter
  c = config.data
  tasks = {t: spec.get("feature") or t for t, spec in (config.get("tasks") or {}).items()
           if spec.get("kind") in ("multiclass", "binary")}
  if tasks:
    accuracy = baselines.scores(c, (name,), tuple(set(tasks.values())))
    row = {f"{c.eval_split}/{t}/accuracy": accuracy[feature][name] for t, feature in tasks.items()}
  else:
    row = {f"{c.eval_split}/accuracy": baselines.scores(c, (name,))["label"][name]}
  root = epath.Path(config_lib.resolve_path(workdir))
  root.mkdir(parents=True, exist_ok=True)
  config_lib.run_config_path(root).write_text(config.to_json_best_effort(indent=2))
  writer = MetricWriter(root, "eval_metrics", tensorboard=False)
  row[f"{c.eval_split}/num_examples"] = data.num_examples(c, c.eval_split)
  writer.path.unlink(missing_ok=True)  # one row: a rerun replaces it
  writer.write(0, row)
  return row


def main(flag_values: flags.FlagValues) -> None:
  from jtl import baselines, evaluate
  from jtl.errors import ConfigError
  if flag_values.kind == "baseline":
    if flag_values.baseline not in baselines.NAMES:
      raise ConfigError(f"--baseline={flag_values.baseline!r}: use one of "
                        f"{', '.join(baselines.NAMES)}")
    row = write_baseline(cli.load_config(flag_values), flag_values.workdir, flag_values.baseline)
    print(f"{flag_values.baseline}: {row}", flush=True)
    return
  train_cli.main(flag_values)
  if signals.requested():  # stopped early (checkpoint saved): the rerun resumes, then evaluates
    return
  evaluate.evaluate_checkpoints(None, flag_values.workdir)  # the run's config.json, all checkpoints


if __name__ == "__main__":
  cli.run(define_flags, main)
