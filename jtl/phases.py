"""Phase schedules in one run: LP-FT (Kumar et al. 2022), gradual unfreezing (Howard & Ruder 2018).

  config.phases = ((0, (("params/head/.*", True), (".*", False))),      # linear probe ...
                   (100, ((".*", True),), (("params/backbone/.*", 0.1),)))  # ... then everything

Each entry is `(start_step, trainable rules[, lr_mults])`: from `start_step` on, the trainable mask is
that rule table (it replaces `config.trainable`), and `lr_mults`, if given, replace `optim.lr_mults`.
The first phase starts at 0. The phase is a pure function of the step, so a resumed run needs no extra
state. Each phase compiles its own step once (frozen leaves cost no backward pass in any phase).

Optimizer state across a phase change: every leaf belongs to the *join group* of the first phase in
which it trains; each group has its own optimizer state (moments and bias-correction count, via
`optax.partition` in `jtl.optim`). At a change, the state of groups already training carries over
(matched by path) and the group that joins starts fresh; the learning-rate schedule's count is shared.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
import ml_collections

from jtl import masks
from jtl.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Phase:
  index: int
  start: int
  end: int
  trainable: Any  # rule table
  lr_mults: Any | None  # rule table, or None: optim.lr_mults


def schedule(config: ml_collections.ConfigDict) -> list[Phase]:
  """The run's phases (one covering every step when `config.phases` is empty)."""
  entries = config.get("phases") or ()
  total = config.total_steps
  if not entries:
    return [Phase(0, 0, total, config.trainable, None)]
  out = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
      raise ConfigError(f"phases[{i}] must be (start_step, trainable_rules[, lr_mults]), got "
                        f"{entry!r} (--config.phases)")
    start = entry[0]
    previous = out[-1].start if out else -1
    if i and isinstance(start, int) and start > previous and start >= total:
      raise ConfigError(_ends_before_phase(total, i, entries))
    if not isinstance(start, int) or isinstance(start, bool) or start <= previous or start >= total:
      raise ConfigError(f"phases[{i}] starts at {start!r}; starts must be increasing integers in "
                        f"[0, total_steps={total}), the first 0 (--config.phases)")
    if i == 0 and start != 0:
      raise ConfigError(f"the first phase must start at step 0, not {start} (--config.phases)")
    out.append(Phase(i, start, total, entry[1], entry[2] if len(entry) == 3 else None))
  return [dataclasses.replace(p, end=nxt.start) for p, nxt in zip(out, out[1:])] + [out[-1]]


def _ends_before_phase(total: int, i: int, entries: Any) -> str:
  """The message for a run too short for its phases, in the terms the user changed: total_steps
  (shortening a run), or the config file's phase-length argument (finetune configs: lp_steps,
  unfreeze_every), not the phases table they never wrote."""
  starts = [entry[0] for entry in entries if isinstance(entry, (tuple, list)) and entry]
  return (f"total_steps={total} ends before phase {i + 1} of {len(entries)} begins (at step "
          f"{entries[i][0]}; this run's phases start at steps {', '.join(map(str, starts))}); "
          f"raise --config.total_steps above {starts[-1]}, or shorten the phases with the config "
          "file's argument (finetune configs: lp_steps= for method=lpft, unfreeze_every= for "
          "method=unfreeze, e.g. --config=experiments/configs/finetune_digits.py:method=lpft,"
          "lp_steps=10)")


def at(phases: list[Phase], step: int) -> Phase:
  """The phase that runs update number `step` (0-based)."""
  return [p for p in phases if p.start <= step][-1]


def phase_config(config: ml_collections.ConfigDict, phase: Phase) -> ml_collections.ConfigDict:
  """`config` as the phase sees it: its trainable rules and learning-rate multipliers."""
  if not config.get("phases"):
    return config
  config = copy.deepcopy(config)
  with config.ignore_type():  # a phase may name a preset (a string) where the run had a rule table
    config.trainable = phase.trainable
    if phase.lr_mults is not None:
      config.optim.lr_mults = phase.lr_mults
  return config


def join_groups(params: Any, config: ml_collections.ConfigDict) -> Any | None:
  """Label tree: for each leaf the index of the first phase in which it trains (None without phases).

  Every phase's rule table is matched here, so a bad pattern in any phase stops the run at start-up.
  """
  phases = schedule(config)
  if not config.get("phases"):
    return None
  groups = jax.tree.map(lambda _: -1, params)
  for phase in phases:
    mask = masks.trainable_mask(params, phase.trainable)
    groups = jax.tree.map(lambda g, m, i=phase.index: i if (g < 0 and m) else g, groups, mask)
  return groups


def carry_over(old: Any, new: Any) -> Any:
  """`new` (a fresh optimizer state) with every leaf that `old` has at the same path and shape."""
  old_leaves = dict(zip(masks.leaf_paths(old, ""), jax.tree.leaves(old)))
  paths = masks.leaf_paths(new, "")
  leaves = [old_leaves[p] if p in old_leaves and old_leaves[p].shape == leaf.shape else leaf
            for p, leaf in zip(paths, jax.tree.leaves(new))]
  return jax.tree.unflatten(jax.tree.structure(new), leaves)
