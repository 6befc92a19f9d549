"""SupCon (supervised contrastive) pretraining on digits 0-4; same encoder, views and evaluators as
simclr_digits.py.

  python -m experiments.train --config=experiments/configs/supcon_digits.py \
      --workdir=/tmp/jtl/supcon [--config.total_steps=600]
  python -m experiments.evaluate --workdir=/tmp/jtl/supcon

`--config.contrastive.supcon_form=in` switches to eq. 3 of Khosla et al. (default: eq. 2, 'out').
"""
from experiments.configs import simclr_digits


def get_config(arg=None):
  c = simclr_digits.get_config(arg)
  c.objective = "supcon"
  return c
