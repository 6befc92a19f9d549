"""MAML / FOMAML / ANIL meta-trained on digits 0-4, tested on 5-way 1- and 5-shot episodes of 5-9.

  python -m experiments.train --config=experiments/configs/maml_digits.py:order=2,inner_steps=1 \
      --workdir=/tmp/jtl/maml
  python -m experiments.train --config=experiments/configs/maml_digits.py:order=1 \
      --workdir=/tmp/jtl/fomaml
  python -m experiments.train --config=experiments/configs/maml_digits.py:inner=head \
      --workdir=/tmp/jtl/anil
  python -m experiments.evaluate --workdir=/tmp/jtl/maml

Arguments:
  order             2 (MAML, second-order meta-gradient) or 1 (FOMAML);
  inner_steps       K, the inner SGD steps per training episode (default 1, as Finn et al. on
                    Omniglot);
  eval_inner_steps  inner steps on a test episode (default 3 * inner_steps; Finn et al. used 1 in
                    training and 3 at test on Omniglot);
  inner             `all` (every parameter adapts: MAML) or `head` (only the 5-way head: ANIL);
  shots, queries    K and Q of the *training* episodes (default 1 and 5: 1-shot training keeps the
                    second-order inner loop cheap on CPU; 5-shot training measured no better).
Training episodes come from the train split of digits 0-4 and test episodes from the test split of
digits 5-9, so the meta-test classes are never seen in meta-training (jtl/data/episodes.py).
`batch_size` counts episodes per step. The model is the transfer configs' `cnn_small` with a 5-way
head. Evaluators: 600 fixed 5-way test episodes at 1 and at 5 shots, each adapted on its support
set (mean accuracy and 95% CI). Options: `config.maml` (jtl/objectives/maml.py).
"""
from experiments.configs.common import base_config, parse_arg
from experiments.configs.protonet_digits import SOURCE_CLASSES, WAYS, episodic_evals
from jtl.objectives import maml

INNER = {"all": ((".*", True),), "head": maml.ANIL}


def get_config(arg=None):
  a = parse_arg(arg, order=2, inner_steps=1, eval_inner_steps=None, inner="all", shots=1, queries=5)
  if a.order not in (1, 2):
    raise ValueError(f"order must be 1 (FOMAML) or 2 (MAML), got {a.order!r}")
  if a.inner not in INNER:
    raise ValueError(f"inner must be one of {', '.join(INNER)}, got {a.inner!r}")
  c = base_config()
  c.objective = "maml"
  c.total_steps = 150
  c.batch_size = 4  # episodes per step
  c.log_every = 50
  c.checkpoint_every = 100
  c.data.labels = SOURCE_CLASSES
  c.data.episodes.ways = WAYS
  c.data.episodes.shots = a.shots
  c.data.episodes.queries = a.queries
  c.model.num_classes = WAYS  # the N-way head that adapts per episode
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.maml = maml.default_config()
  c.maml.inner_steps = a.inner_steps
  # More steps at test than in training, as Finn et al. did on Omniglot (1 step, 3 at test).
  c.maml.eval_inner_steps = 3 * a.inner_steps if a.eval_inner_steps is None else a.eval_inner_steps
  c.maml.first_order = a.order == 1
  c.maml.inner_trainable = INNER[a.inner]
  c.evals = episodic_evals(pixel_baseline=False)
  return c
