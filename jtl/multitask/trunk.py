"""Multitask networks with one shared trunk: hard sharing and low supervision, plus the task heads.

Parameter paths (the contract `jtl.masks` rules and `init_from` rely on):
  params/backbone/...          the shared trunk, with the registry model's own names, so a `hard`
                               checkpoint is the `init_from` of a single-task run (paths
                               `params/backbone/...`, `params/head/...`) with no conversion
  params/heads/<task>/...      one `nn.Dense(num_outputs)` per task, zero kernel and bias at init (a
                               new head sends no random projection back into the trunk)
  params/label_embeddings/<t>  low supervision with `shortcut=embedding`: task t's label embedding E_t

Both archs expose `features(x, train) -> (z, penalties)` and `heads(z, train) -> (outputs, penalties)`
with `__call__ == heads . features` (penalties merged), so the objective can differentiate the task
losses with respect to the shared representation z (one trunk forward, per-task VJPs through the
heads, one trunk backward).

Hard sharing: Caruana, "Multitask learning", 1997. z = the registry backbone's pooled features [B, D].

Low supervision: Søgaard & Goldberg, "Deep multi-task learning with low level tasks supervised at lower
layers", ACL 2016; Hashimoto et al., "A joint many-task model", EMNLP 2017 (JMT). Task t's head reads the
globally pooled output of trunk stage `task.depth` (None: the top stage). A task also reads, as
shortcut inputs concatenated to its pooled features, the predictions of every task attached at a
strictly lower depth (in task order): `shortcut=probs` the predicted distribution (softmax for
multiclass, sigmoid for binary and multilabel, the raw output for regression); `shortcut=embedding`
JMT's label embedding, that distribution times a learned E_t [num_outputs, embedding_dim];
`shortcut=none` nothing. Gradients flow through the shortcuts, as in JMT's joint training. Here z is
`{"stage<k>": [B, C_k]}`, the pooled output of every stage some task reads, and the shortcuts belong
to `heads`, so heads(features(x)) is exactly the network and the representation-space gradients are
exact. JMT's successive regularisation (keeping the lower layers close to their values from the
previous task's phase) is the objective's job; `shared_prefixes` tells it which trunk parameters
each task's head reads.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl.errors import ConfigError
from jtl.models import stages
from jtl.multitask.tasks import Task

Outputs = dict[str, jax.Array]
Penalties = dict[str, jax.Array]
SHORTCUTS = ("probs", "embedding", "none")


class TaskHeads(nn.Module):
  """`heads/<task>`: a zero-initialised `nn.Dense(num_outputs)` per task, in float32.

  Called with `{task_name: input [B, D_t]}` for any subset of the tasks (several calls may build
  the heads of different tasks).
  """
  tasks: tuple[Task, ...]

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array]) -> Outputs:
    widths = {t.name: t.num_outputs for t in self.tasks}
    return {name: nn.Dense(widths[name], kernel_init=nn.initializers.zeros,
                           bias_init=nn.initializers.zeros, name=name)(x.astype(jnp.float32))
            for name, x in inputs.items()}


def prediction(outputs: jax.Array, kind: str) -> jax.Array:
  """The task's predicted distribution (or value) from its pre-activation outputs."""
  if kind == "multiclass":
    return jax.nn.softmax(outputs, axis=-1)
  if kind in ("binary", "multilabel"):
    return jax.nn.sigmoid(outputs)
  return outputs


class TwoPart(nn.Module):
  """`features(x, train) -> (z, penalties)`, `heads(z, train) -> (outputs, penalties)` and
  `__call__(x, train)`, both at once. A subclass builds whichever part is asked for in one compact
  method `_run(x, train, part)` (part: "features", "heads" or "all"), so that `features` and
  `heads` create the same submodules as `__call__`."""
  shared_representation: ClassVar[bool] = True

  def features(self, x: jax.Array, train: bool = False) -> tuple[Any, Penalties]:
    return self._run(x, train, "features")

  def heads(self, z: Any, train: bool = False) -> tuple[Outputs, Penalties]:
    return self._run(z, train, "heads")

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[Outputs, Penalties]:
    return self._run(x, train, "all")


class HardSharing(TwoPart):
  """A registry backbone shared by all tasks (`params/backbone`), one head per task; z = the pooled
  backbone features [B, D] (float32), outputs `{task: [B, num_outputs]}`."""
  backbone: nn.Module
  tasks: tuple[Task, ...]

  @nn.compact
  def _run(self, x: jax.Array, train: bool, part: str) -> tuple[Any, Penalties]:
    if part != "heads":
      x = self.backbone(x, train=train).astype(jnp.float32)
      if part == "features":
        return x, {}
    return TaskHeads(self.tasks, name="heads")({t.name: x for t in self.tasks}), {}


class LabelEmbeddings(nn.Module):
  """`label_embeddings/<task>`: JMT's label embedding matrix per task, [num_outputs, dim]."""
  tasks: tuple[Task, ...]
  dim: int

  @nn.compact
  def __call__(self, task: Task, probs: jax.Array) -> jax.Array:
    table = self.param(task.name, nn.initializers.xavier_uniform(), (task.num_outputs, self.dim))
    return probs @ table


def task_depths(tasks: Sequence[Task], num_stages: int) -> dict[str, int]:
  """Each task's attachment stage (None -> the top); ConfigError for a depth beyond the trunk."""
  depths = {}
  for t in tasks:
    depth = num_stages if t.depth is None else t.depth
    if not 1 <= depth <= num_stages:
      raise ConfigError(f"task {t.name!r}: depth {t.depth} is beyond the trunk's {num_stages} stages; "
                        f"use 1..{num_stages} or None for the top (--config.tasks.{t.name}.depth)")
    depths[t.name] = depth
  return depths


class LowSupervision(TwoPart):
  """A staged trunk (`params/backbone`), each task's head after stage `task.depth`, with shortcuts.
  z = `{"stage<k>": pooled stage-k output [B, C_k]}` for every depth some task reads; `heads` runs
  the lower tasks first (their predictions feed the higher tasks' heads)."""
  backbone: stages.StagedBackbone
  tasks: tuple[Task, ...]
  shortcut: str = "probs"
  embedding_dim: int = 16

  @nn.compact
  def _run(self, x: Any, train: bool, part: str) -> tuple[Any, Penalties]:
    depths = task_depths(self.tasks, self.backbone.num_stages)
    levels = sorted(set(depths.values()))
    if part != "heads":
      z = {}
      for k in range(1, levels[-1] + 1):  # stages above the highest head are not built
        x = self.backbone.stage(x, train, k)
        if k in levels:
          z[f"stage{k}"] = self.backbone.pool(x).astype(jnp.float32)
      if part == "features":
        return z, {}
      x = z
    heads = TaskHeads(self.tasks, name="heads")
    embeddings = (LabelEmbeddings(self.tasks, self.embedding_dim, name="label_embeddings")
                  if self.shortcut == "embedding" else None)
    outputs: Outputs = {}
    for k in levels:
      inputs = [x[f"stage{k}"]]
      if self.shortcut != "none":
        for lower in (t for t in self.tasks if depths[t.name] < k):
          probs = prediction(outputs[lower.name], lower.kind)
          inputs.append(embeddings(lower, probs) if embeddings is not None else probs)
      head_input = jnp.concatenate(inputs, axis=-1)
      outputs.update(heads({t.name: head_input for t in self.tasks if depths[t.name] == k}))
    return {t.name: outputs[t.name] for t in self.tasks}, {}


def shared_prefixes(tasks: Sequence[Task], model_config: Mapping[str, Any]
                    ) -> dict[str, tuple[str, ...]]:
  """For low supervision: `{task: parameter path prefixes of the trunk stages its head reads}`.

  Task t at depth d reads stages 1..d, i.e. the parameters whose paths start with one of
  `params/backbone/<name>` for the registry names of those stages (e.g. `params/backbone/stage1`);
  the same names under `batch_stats/backbone/` hold their BatchNorm statistics. JMT's successive
  regularisation penalises, while task t trains, the drift of the stages below its depth.
  """
  trunk = stages.staged(model_config, needed_by="arch 'low_supervision'")
  depths = task_depths(tasks, trunk.num_stages)
  return {name: tuple(f"params/backbone/{prefix}" for k in range(1, depth + 1)
                      for prefix in trunk.stage_prefixes(k))
          for name, depth in depths.items()}
