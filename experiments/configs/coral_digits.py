"""Domain adaptation, printed -> handwritten digits, by moment matching: Deep CORAL or MMD.

  python -m experiments.train --config=experiments/configs/coral_digits.py:method=coral \
      --workdir=runs/coral
  python -m experiments.train --config=experiments/configs/coral_digits.py:method=mmd --workdir=runs/mmd
  python -m experiments.evaluate --workdir=runs/coral    # test/target/accuracy, test/source/accuracy

The setting (data, model, steps, evaluation) is dann_digits.py's; its `mode=source_only` and
`mode=target_supervised` are the baselines of these runs too.

Arguments (all optional):
  method  coral  Deep CORAL (objective `coral`): weight * ||C_s - C_t||_F^2 / (4 d^2) on the
                 backbone's features (Sun & Saenko 2016);
          mmd    multi-kernel Gaussian MMD^2 on the same features (objective `mmd`; biased
                 V-statistic unless --config.domain.mmd_estimator=unbiased).
  weight  the discrepancy's weight (domain.weight).
  init    a run (or weights file) whose backbone the model starts from (dann_digits.py's `init`).
"""
from experiments.configs.common import parse_arg
from experiments.configs.dann_digits import domain_config

# CORAL's value is divided by 4 d^2 (d = 64 features here), so it needs a large weight to matter
# against the cross-entropy; Sun & Saenko pick it so that the two losses end of the same order.
DEFAULT_WEIGHTS = {"coral": 100.0, "mmd": 0.1}


def get_config(arg=None):
  a = parse_arg(arg, method="coral", weight=None, init="")
  if a.method not in DEFAULT_WEIGHTS:
    raise ValueError(f"unknown method {a.method!r}; use one of {', '.join(DEFAULT_WEIGHTS)}")
  c = domain_config(a.method, "adapt", a.init)
  c.domain.weight = float(DEFAULT_WEIGHTS[a.method] if a.weight is None else a.weight)
  return c
