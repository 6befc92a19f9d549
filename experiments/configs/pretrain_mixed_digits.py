"""Source task with more source data: handwritten digits 0–4 plus *printed* digits 0–9 (sim-to-real).

  python -m experiments.train --config=experiments/configs/pretrain_mixed_digits.py \
      --workdir=/tmp/jtl/pretrain_mixed
  python -m experiments.evaluate --workdir=/tmp/jtl/pretrain_mixed

The demo's pretraining (`make demo`). One `cnn_small` backbone, two heads, each step a batch of each
(the multitask objective with hard sharing over `config.data.mixture`):
  handwritten  `sklearn_digits`, digits 0–4 only (as pretrain_digits.py), a 5-way head;
  printed      `printed_digits/elastic`, all ten digits rendered from the fonts inside matplotlib
               and distorted elastically like handwriting (jtl/data/printed_digits.py), a 10-way head.
No handwritten 5–9 is seen, but the target classes 5–9 *are* seen in the printed (synthetic) domain:
the few-shot target task becomes sim-to-real transfer, not transfer to unseen classes. That is the
point: a linear classifier on raw pixels already gets ~0.72 from one handwritten example per class,
and features learnt on five other classes alone do not beat it (docs/transfer.md, "Transfer on the digits").

The backbone is `params/backbone/...` as in `cnn_small`, so a run is the `init_from` of
`transfer_digits.py` as it is (`pretrain=<this workdir>`; the two heads are not loaded). Evaluation:
`test/handwritten/accuracy` (digits 0–4) and `test/printed/accuracy`.
"""
import ml_collections

from experiments.configs import multitask_digits, pretrain_digits

PRINTED_CLASSES = tuple(range(10))


def get_config(arg=None):
  del arg
  c = multitask_digits.get_config("data=mixture")
  c.total_steps = 800
  c.batch_size = 64  # 32 handwritten + 32 printed per step
  c.log_every = 50
  c.checkpoint_every = 100
  c.data.augment = True
  c.data.mixture = ml_collections.ConfigDict(dict(
      handwritten=dict(name="sklearn_digits", labels=pretrain_digits.SOURCE_CLASSES, weight=1.0),
      printed=dict(name="printed_digits/elastic", labels=PRINTED_CLASSES, weight=1.0)))
  c.tasks.handwritten.num_outputs = len(pretrain_digits.SOURCE_CLASSES)
  c.tasks.printed.num_outputs = len(PRINTED_CLASSES)
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  return c
