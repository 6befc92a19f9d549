"""Small, fast configs for trainer tests (the embedded digits, a few steps)."""
from __future__ import annotations

from typing import Any

import ml_collections

from experiments.configs import pretrain_digits, transfer_digits


def digits_config(transfer_mode: str | None = None, **overrides: Any) -> ml_collections.ConfigDict:
  """pretrain_digits (or transfer_digits in `transfer_mode`) cut down to a few steps.

  `overrides` use flattened keys with '__' for '.', e.g. `mesh__axes=(('data', 1),)`.
  """
  if transfer_mode:
    config = transfer_digits.get_config(f"mode={transfer_mode},shots=5")
  else:
    config = pretrain_digits.get_config()
  config.total_steps = 20
  config.batch_size = 16
  config.log_every = 5
  config.checkpoint_every = 10
  config.model.widths = (8, 16)
  config.optim.warmup_steps = 2
  config.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return config
