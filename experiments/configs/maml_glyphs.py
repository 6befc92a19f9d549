"""MAML, first-order MAML and ANIL on `glyphs`: meta-trained on the background scripts, tested on the
evaluation scripts (Omniglot's protocol, as `protonet_glyphs.py`).

  python -m experiments.train --config=experiments/configs/maml_glyphs.py:method=maml \
      --workdir=runs/maml_g
  python -m experiments.evaluate --workdir=runs/maml_g

Arguments (`maml_glyphs.py:method=maml,inner_steps=1,shots=1,queries=5,rotations=4`, the defaults):
  method        `maml` (second-order meta-gradient through the inner loop), `fomaml` (first order:
                the inner gradients are constants) or `anil` (only the head adapts in the inner loop,
                Raghu et al. 2020; second order, which is cheap when only the head adapts);
  inner_steps   inner SGD steps per training episode (Finn et al. on Omniglot: 1 in training, 3 at
                test);
  eval_inner_steps  inner steps on a test episode, default 10x `inner_steps`: chosen among 1, 3
                and 10 on a held-out background script (`holdout=arabic`, docs/glyphs.md), at 1
                shot and at 5;
  shots, queries  K and Q of the 5-way *training* episodes;
  rotations     4: each background character also turned by 90, 180 and 270 degrees as three new
                training classes, Finn et al.'s Omniglot augmentation (after Santoro et al. 2016);
                1: the characters as drawn (`data.episodes.rotations`, jtl/data/episodes.py);
  holdout       a background script (e.g. `arabic`; default none) left out of meta-training, whose
                characters become a validation set: the evaluators are then 600 5-way 1-shot
                and 600 5-shot episodes of it, scored after 1, 3 and 10 adaptation steps
                (`train/holdout/{1,3,10}steps/5way{1,5}shot_accuracy`), to choose
                `eval_inner_steps` without looking at the evaluation scripts (docs/glyphs.md).
The model is the four-block ConvNet of `protonet_glyphs.py` (64 channels per block) with a 5-way head
(`params/head/...`, zero-initialised, so every task starts at uniform predictions); inner step size
0.4 as Finn et al. on Omniglot. `batch_size` counts episodes per step.

Evaluators, on 600 fixed episodes of the evaluation scripts (the same episodes as ProtoNet's), with
the raw-pixel prototypes beside each:
  5-way 1- and 5-shot, adapting on each episode's support set (`test/5way{1,5}shot_*`; also nearest
  prototypes on the meta-learned backbone's frozen features, `test/proto/5way{1,5}shot_*`);
  20-way 1- and 5-shot by nearest prototypes on the backbone (`test/20way{1,5}shot_*`): a 5-way head
  cannot adapt to a 20-way episode, so the 20-way columns are the backbone's features scored like
  every other encoder's.
Figures: docs/glyphs.md.
"""
import ml_collections

from experiments.configs.common import base_config, parse_arg
from experiments.configs.protonet_glyphs import EVAL_EPISODES
from jtl.data import glyphs
from jtl.errors import ConfigError
from jtl.objectives import maml

WAYS = 5  # the head's width: training and adapted test episodes are 5-way
HOLDOUT_STEPS = (1, 3, 10)  # the adaptation steps that `holdout` compares
METHODS = {  # method -> (first_order, inner_trainable)
    "maml": (False, ((".*", True),)),
    "fomaml": (True, ((".*", True),)),
    "anil": (False, maml.ANIL),
}


def maml_glyph_evals(num_episodes: int = 600) -> ml_collections.ConfigDict:
  """On the test split (the evaluation scripts), the episodes of `protonet_glyphs.EVAL_EPISODES`:
  5-way ones adapted for `maml.eval_inner_steps` steps (the keys `test/5way{1,5}shot_*`, raw-pixel
  prototypes beside them) and also scored by prototypes on the backbone (`test/proto/5way...`);
  20-way ones by prototypes on the backbone (`test/20way...`: a 5-way head cannot adapt to them)."""
  evals = {}
  for n, k in EVAL_EPISODES:
    common = dict(type="episodic", split="test", ways=n, shots=k, queries=5,
                  num_episodes=num_episodes, seed=0)
    if n == WAYS:
      evals[f"episodic_{n}way{k}shot"] = dict(common, method="adapt", pixel_baseline=True,
                                              batch_size=1)  # one episode a call: see grad_accum
      evals[f"proto_{n}way{k}shot"] = dict(common, method="prototypes", tag="proto", batch_size=200)
    else:
      evals[f"episodic_{n}way{k}shot"] = dict(common, method="prototypes", pixel_baseline=True,
                                              batch_size=200)
  return ml_collections.ConfigDict(evals)


def holdout_evals(held: list[int], num_episodes: int = 600) -> ml_collections.ConfigDict:
  """5-way 1- and 5-shot episodes of the classes `held` (labels of the train split), adapted for
  each of `HOLDOUT_STEPS` steps: `train/holdout/<n>steps/5way<k>shot_accuracy`, pixels beside the
  first."""
  return ml_collections.ConfigDict({
      f"holdout_{k}shot_{n}steps": dict(
          type="episodic", split="train", data=dict(labels=held), ways=WAYS, shots=k, queries=5,
          num_episodes=num_episodes, seed=0, method="adapt", adapt_steps=n,
          tag=f"holdout/{n}steps", pixel_baseline=n == HOLDOUT_STEPS[0], batch_size=1)
      for k in (1, 5) for n in HOLDOUT_STEPS})


def get_config(arg=None):
  a = parse_arg(arg, method="maml", inner_steps=1, eval_inner_steps=None, shots=1, queries=5,
                rotations=4, holdout="")
  if a.method not in METHODS:
    raise ValueError(f"unknown method {a.method!r}; use one of {', '.join(METHODS)}")
  if a.holdout and a.holdout not in glyphs.BACKGROUND:
    raise ConfigError(f"maml_glyphs.py:holdout={a.holdout!r} is not a background script; use one "
                      f"of {', '.join(glyphs.BACKGROUND)}")
  c = base_config()
  c.objective = "maml"
  # 10,000 steps of 4 episodes: about 50 minutes on 2 CPU cores (3.3 steps/s), 5-way 1-shot 0.923
  # over 3 seeds with 10 inner steps at test, 0.917 with 3 (4,000 steps without rotations: 0.897;
  # docs/glyphs.md).
  c.total_steps = 10000
  c.batch_size = 4  # episodes per step
  # One episode per micro-batch (same update): under vmap the per-episode adapted weights make every
  # convolution a grouped one, which XLA:CPU runs about 5x slower than 4 plain ones (2.5 s against
  # 0.5 s a step, measured).
  c.grad_accum_steps = 4
  c.log_every = 250
  c.checkpoint_every = 2000  # each evaluation adapts on 1,200 episodes: about 6 minutes on 2 cores
  c.data.name = "glyphs"
  c.data.eval_split = "test"
  c.data.episodes.ways = WAYS
  c.data.episodes.shots = a.shots
  c.data.episodes.queries = a.queries
  c.data.episodes.rotations = a.rotations
  c.model.widths = (64, 64, 64, 64)
  c.model.num_classes = WAYS  # the N-way head that adapts per episode
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.maml = maml.default_config()
  c.maml.inner_steps = a.inner_steps
  c.maml.inner_lr = 0.4  # Finn et al.'s Omniglot step size
  c.maml.eval_inner_steps = 10 * a.inner_steps if a.eval_inner_steps is None else a.eval_inner_steps
  c.maml.first_order, c.maml.inner_trainable = METHODS[a.method]
  c.evals = maml_glyph_evals()
  if a.holdout:
    chars = [ch for ch in glyphs.characters() if ch.script in glyphs.BACKGROUND]
    c.data.labels = [ch.label for ch in chars if ch.script != a.holdout]
    c.evals = holdout_evals([ch.label for ch in chars if ch.script == a.holdout])
  return c
