"""Prototypical networks on `glyphs`: meta-trained on the background scripts, tested on the evaluation
scripts (Omniglot's protocol: no evaluation script, hence no test character, is seen in training).

  python -m experiments.train --config=experiments/configs/protonet_glyphs.py --workdir=runs/proto_g
  python -m experiments.evaluate --workdir=runs/proto_g

The dataset (`glyphs`, jtl/data/glyphs.py) is prepared on first use, offline, in about a minute.
Figures: docs/glyphs.md.

Arguments (`protonet_glyphs.py:ways=20,shots=1,queries=5,rotations=1`, the defaults): N, K and Q of
the *training* episodes, and `rotations=4` adds each background character turned by 90, 180 and 270
degrees as three new training classes (jtl/data/episodes.py). Snell et al. (2017) train Omniglot
with more ways than they test (60 against 5/20), with the test's shot count and with rotated classes;
20-way 1-shot training is the cheap version of that here, and `ways=60,rotations=4` their recipe
(5-way 1-shot 0.951 against 0.935: docs/glyphs.md).
`batch_size` counts episodes per step. The encoder is the standard four-block ConvNet of the
few-shot literature (`cnn_small` with widths 64 x 4, no head: `params/backbone/...`).
Evaluators: 600 fixed episodes of the evaluation scripts, 5-way and 20-way, at 1 and 5 shots
(nearest prototype; mean accuracy and 95% CI), with nearest prototypes on the raw pixels of the same
episodes beside each.
"""
import ml_collections

from experiments.configs.common import base_config, parse_arg

EVAL_EPISODES = ((5, 1), (5, 5), (20, 1), (20, 5))  # (ways, shots)


def glyph_episodic_evals(num_episodes=600, pixel_baseline=True,
                         episodes=EVAL_EPISODES) -> ml_collections.ConfigDict:
  """One `episodic` evaluator per (ways, shots), on the test split (the evaluation scripts)."""
  return ml_collections.ConfigDict({
      f"episodic_{n}way{k}shot": dict(type="episodic", split="test", ways=n, shots=k, queries=5,
                                      num_episodes=num_episodes, seed=0,
                                      pixel_baseline=pixel_baseline, batch_size=200)
      for n, k in episodes})


def get_config(arg=None):
  a = parse_arg(arg, ways=20, shots=1, queries=5, rotations=1)
  c = base_config()
  c.objective = "protonet"
  c.total_steps = 3000  # docs/glyphs.md: 5-way 1-shot 0.913 / 0.931 / 0.935 at 1,000 / 2,000 / 3,000
  # (ways=60: 0.932 / 0.939 / 0.941; ways=60,rotations=4: 0.931 / 0.947 / 0.951; seeds 1, 2: 0.950)
  c.batch_size = 1  # episodes per step (a multiple of the devices of the batch axes)
  c.log_every = 100
  c.checkpoint_every = 1000
  c.data.name = "glyphs"
  c.data.eval_split = "test"
  c.data.episodes.ways = a.ways
  c.data.episodes.shots = a.shots
  c.data.episodes.queries = a.queries
  c.data.episodes.rotations = a.rotations
  c.model.widths = (64, 64, 64, 64)
  c.model.num_classes = 0  # an encoder: ProtoNet has no head
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.evals = glyph_episodic_evals()
  return c
