"""Prototypical networks meta-trained on digits 0-4, tested on 5-way 1- and 5-shot episodes of 5-9.

  python -m experiments.train --config=experiments/configs/protonet_digits.py \
      --workdir=/tmp/jtl/protonet
  python -m experiments.evaluate --workdir=/tmp/jtl/protonet

Arguments (`protonet_digits.py:shots=5,queries=5`, the defaults): K and Q of the *training*
episodes, which are 5-way (the five source digits). Training episodes come from the train split of
digits 0-4 and test episodes from the test split of digits 5-9, so the meta-test classes are never
seen in meta-training (jtl/data/episodes.py). `batch_size` counts episodes per step. The encoder
is the transfer configs' `cnn_small` without a head (`params/backbone/...`), so a checkpoint is
the `init_from` of `transfer_digits.py` as it is. Evaluators: 600 fixed 5-way test episodes at 1
and at 5 shots (nearest prototype; mean accuracy and 95% CI), with the raw-pixel prototype
baseline on the same episodes.
"""
import ml_collections

from experiments.configs.common import base_config, parse_arg

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
WAYS = 5


def episodic_evals(shots=(1, 5), num_episodes=600,
                   pixel_baseline=True) -> ml_collections.ConfigDict:
  """One `episodic` evaluator per shot count, on 5-way episodes of the test digits 5-9 (40 images,
  or 40 episodes for MAML, per evaluation call)."""
  return ml_collections.ConfigDict({
      f"episodic_{k}shot": dict(type="episodic", data=dict(labels=TARGET_CLASSES), ways=WAYS,
                                shots=k, queries=15, num_episodes=num_episodes, seed=0,
                                pixel_baseline=pixel_baseline, batch_size=40)
      for k in shots})


def get_config(arg=None):
  a = parse_arg(arg, shots=5, queries=5)
  c = base_config()
  c.objective = "protonet"
  c.total_steps = 200  # the episode loss on 0-4 is ~0 by step 100
  c.batch_size = 4  # episodes per step
  c.log_every = 50
  c.checkpoint_every = 100
  c.data.labels = SOURCE_CLASSES
  c.data.episodes.ways = WAYS
  c.data.episodes.shots = a.shots
  c.data.episodes.queries = a.queries
  c.model.num_classes = 0  # an encoder: ProtoNet has no head
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.evals = episodic_evals()
  return c
