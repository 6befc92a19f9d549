"""Few-shot evidence: every learner of digits 0-4, scored on the same fixed 5-way test episodes of 5-9.

  python -m experiments.train --config=experiments/configs/episodes_digits.py:learner=protonet \
      --workdir=runs/episodes/protonet
  python -m experiments.sweep --config=experiments/configs/episodes_digits.py:sweep=table \
      --workdir=runs/episodes_table [--parallel=2]
  python -m experiments.report --workdir=runs/episodes_table

`learner=NAME` is that learner's own config, its evaluators replaced by the `episodic` evaluator at
1 and 5 shots on 600 fixed test episodes of digits 5-9 (seed 0, 15 queries per class; mean accuracy
and 95% interval) with the raw-pixel prototype baseline on the same episodes. Every learner sees
only digits 0-4 of the train split:
  pretrain   `pretrain_digits.py` (5-way softmax on 0-4), nearest prototypes on its frozen backbone;
  protonet   `protonet_digits.py`, nearest prototypes on its encoder;
  maml / fomaml / anil   `maml_digits.py` with order=2, order=1 and inner=head, adapting on each test
             episode's support set as in training;
  simclr / supcon   `simclr_digits.py`, `supcon_digits.py`: prototypes on frozen contrastive features.
Sweep `table` (the README's meta-learning table) runs each learner once and shows the raw-pixel
prototypes (no learning) as the first row (the pixel scores of the first learner's evaluation).
"""
from experiments.configs import (maml_digits, pretrain_digits, protonet_digits, simclr_digits,
                                 supcon_digits)
from experiments.configs.common import parse_arg
from jtl import sweep

SHOTS = (1, 5)
LEARNERS = {  # learner -> (config module, its argument, the table's row)
    "pretrain": (pretrain_digits, None, "supervised pretraining, prototypes on its features"),
    "protonet": (protonet_digits, None, "ProtoNet"),
    "maml": (maml_digits, "order=2", "MAML (second order)"),
    "fomaml": (maml_digits, "order=1", "FOMAML"),
    "anil": (maml_digits, "inner=head", "ANIL"),
    "simclr": (simclr_digits, None, "SimCLR, prototypes on its features"),
    "supcon": (supcon_digits, None, "SupCon, prototypes on its features"),
}
CONFIG = "experiments/configs/episodes_digits.py"


def get_config(arg=None):
  a = parse_arg(arg, learner="protonet", episodes=600)
  if a.learner not in LEARNERS:
    raise ValueError(f"unknown learner {a.learner!r}; use one of {', '.join(LEARNERS)}")
  module, learner_arg, _ = LEARNERS[a.learner]
  c = module.get_config(learner_arg)
  c.evals = protonet_digits.episodic_evals(SHOTS, a.episodes, pixel_baseline=True)
  c.checkpoint_every = c.total_steps  # 2 x 600 episodes per evaluation: the final checkpoint only
  return c


def metric(k: int, kind: str = "", stat: str = "accuracy") -> str:
  return f"test/5way{k}shot{'_' + kind if kind else ''}_{stat}"


def get_sweep(name):
  """`table`: each learner once (their own seeds), and the raw-pixel prototypes on the same episodes."""
  if name != "table":
    raise ValueError(f"unknown sweep {name!r}; episodes_digits.py has: table")
  cells = [sweep.Cell("pixels", variant="raw-pixel prototypes (no learning)", kind="view",
                      of=next(iter(LEARNERS)),
                      rename={metric(k, "pixel", s): metric(k, "", s) for k in SHOTS
                              for s in ("accuracy", "ci95")})]
  cells += [sweep.Cell(learner, variant=row, config=f"{CONFIG}:learner={learner}")
            for learner, (_, _, row) in LEARNERS.items()]
  return sweep.Sweep(name, cells, metrics=tuple(metric(k, "", s) for k in SHOTS
                                                for s in ("accuracy", "ci95")), title=(
      "5-way accuracy and its 95% interval on 600 fixed test episodes of digits 5-9 (15 queries per "
      "class); every learner saw only digits 0-4"))
