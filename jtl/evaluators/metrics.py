"""`metrics`: the objective's per-example `eval_metrics`, averaged over a whole split (padding masked).

With a data mixture (`config.data.mixture`, one dataset per task) each member's split is evaluated on
its own: the objective sees batches `{task: batch}` holding that one task, and names its metrics.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jtl import data
from jtl.evaluators.base import Evaluator, masked_sums, register, split_batches
from jtl.sharding import to_global


@register("metrics")
class Metrics(Evaluator):
  """Yields `<split>/<metric>` for every metric of the objective, and `<split>/num_examples`."""

  def __init__(self, s, name, cfg):
    super().__init__(s, name, cfg)
    members = data.mixture_members(self.data_config)
    # (task or None, factory of batches): one pass over the split, or one per mixture member.
    self.passes = [(task, split_batches(s, member, self.split, self.batch_size)[0])
                   for task, member in members.items()] or [
                       (None, split_batches(s, self.data_config, self.split, self.batch_size)[0])]
    objective = s.objective

    def sums(params, model_state, batch, mask):
      return masked_sums(objective.eval_metrics(params, model_state, batch), mask), jnp.sum(mask)

    self._sums = jax.jit(sums, out_shardings=NamedSharding(s.mesh, PartitionSpec()))

  def run(self, params: Any, model_state: Any) -> Iterator[tuple[str, float]]:
    for task, make_batches in self.passes:
      totals, count = None, 0.0
      for local_batch in make_batches():
        batch = to_global(local_batch, self.setup.batch_sharding)
        mask = batch["mask"]
        batch_sums, n = self._sums(params, model_state, batch if task is None else {task: batch}, mask)
        totals = batch_sums if totals is None else jax.tree.map(jnp.add, totals, batch_sums)
        count = count + n
      totals, count = jax.device_get((totals, count))
      for name, total in sorted(totals.items()):
        yield f"{self.prefix}/{name}", float(total / count)
      yield f"{self.prefix}/{task + '/' if task else ''}num_examples", int(count)
