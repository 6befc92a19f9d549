"""Few-shot evidence: 5-way 1- and 5-shot accuracy (95% interval) on test episodes of digits 5-9.

  python -m experiments.episodes_table [--workdir=/tmp/jtl/episodes_table] [--episodes=600]

Every learner sees only digits 0-4 of the train split. Every row is scored on the same fixed test
episodes of digits 5-9 (seed 0, 15 queries per class), by the `episodic` evaluator on the final
checkpoint. The rows:
  raw-pixel prototypes   nearest class mean of the support pixels, no learning at all;
  supervised pretraining the demo's `pretrain_digits.py` run (5-way softmax on 0-4), nearest
                         prototypes on its frozen backbone features;
  protonet               `protonet_digits.py`, nearest prototypes on its encoder;
  maml / fomaml / anil   `maml_digits.py` with order=2, order=1 and inner=head, each adapting on
                         the test episode's support set as in training;
  simclr / supcon        `simclr_digits.py`, `supcon_digits.py`: nearest prototypes on the frozen
                         features of a contrastive encoder.
Each run trains in-process through `jtl.train.train` on one device, in WORKDIR/<run>. The table
reports training seconds too (wall clock on this machine, compilation included).
"""
from __future__ import annotations

import time

from absl import app, flags, logging
from etils import epath

from experiments.configs import (maml_digits, pretrain_digits, protonet_digits, simclr_digits,
                                 supcon_digits)
from jtl import evaluate, train
from jtl.config import resolve_path
from jtl.metric_writer import read_jsonl

flags.DEFINE_string("workdir", "/tmp/jtl/episodes_table", "Parent folder of the runs.")
flags.DEFINE_integer("episodes", 600, "Test episodes per shot count.")
flags.DEFINE_bool("fresh", True, "Delete earlier runs in --workdir first (False: reuse them).")
FLAGS = flags.FLAGS

SHOTS = (1, 5)
RUNS = {  # row name -> (config module, config argument)
    "supervised pretraining": (pretrain_digits, None),
    "protonet": (protonet_digits, None),
    "maml (second order)": (maml_digits, "order=2"),
    "fomaml (first order)": (maml_digits, "order=1"),
    "anil (head adapts)": (maml_digits, "inner=head"),
    "simclr (contrastive)": (simclr_digits, None),
    "supcon (contrastive)": (supcon_digits, None),
}


def final_row(config, workdir: epath.Path) -> tuple[dict, float]:
  """Trains (or resumes) `config` in `workdir` and evaluates its last checkpoint.

  Returns (the evaluation row, seconds spent training)."""
  config.mesh.axes = (("data", 1),)
  config.evals = protonet_digits.episodic_evals(SHOTS, FLAGS.episodes, pixel_baseline=True)
  start = time.time()
  train.train(config, str(workdir))
  seconds = time.time() - start
  evaluate.evaluate_checkpoints(config, str(workdir), step=config.total_steps)
  rows = [r for r in read_jsonl(workdir / "eval_metrics.jsonl") if r["step"] == config.total_steps]
  return rows[-1], seconds


def scores(row: dict, kind: str = "") -> list[tuple[float, float]]:
  """[(accuracy, ci95)] per shot count from an evaluation row ('pixel': the raw-pixel baseline)."""
  keys = [f"test/5way{k}shot{'_' + kind if kind else ''}" for k in SHOTS]
  return [(row[key + "_accuracy"], row[key + "_ci95"]) for key in keys]


def versus(score: tuple[float, float], baseline: tuple[float, float]) -> str:
  """'+' / '-' when the 95% intervals do not overlap, '=' when they do."""
  if score[0] - score[1] > baseline[0] + baseline[1]:
    return "+"
  return "-" if score[0] + score[1] < baseline[0] - baseline[1] else "="


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = epath.Path(resolve_path(FLAGS.workdir))
  if FLAGS.fresh and root.exists():
    root.rmtree()
  begin = time.time()
  lines = []
  for name, (module, arg) in RUNS.items():
    config = module.get_config(arg)
    row, seconds = final_row(config, root / name.split()[0])
    if not lines:  # the pixel baseline: same episodes, nothing learned
      lines.append(("raw-pixel prototypes", scores(row, "pixel"), "-", "-"))
    lines.append((name, scores(row), f"{config.total_steps}", f"{seconds:.0f}"))
    print(f"{name}: done in {time.time() - begin:.0f}s", flush=True)
  print(f"\n5-way accuracy on {FLAGS.episodes} test episodes of digits 5-9 (mean ± 95% CI, "
        "15 queries per class); every learner saw only digits 0-4.\n+/-/= : above, below or "
        "level with raw-pixel prototypes (95% intervals apart or overlapping)")
  print(f"{'method':<24}" + "".join(f"{k:>2}-shot{'':>11}" for k in SHOTS) + "  steps  train s")
  pixels = lines[0][1]
  for i, (name, cells, steps, seconds) in enumerate(lines):
    marks = [" " if i == 0 else versus(c, p) for c, p in zip(cells, pixels)]
    print(f"{name:<24}" + "".join(f"{a:.3f} ± {h:.3f} {m}  " for (a, h), m in zip(cells, marks))
          + f"{steps:>5}{seconds:>9}")
  print(f"total time: {time.time() - begin:.0f}s")


if __name__ == "__main__":
  app.run(main)
