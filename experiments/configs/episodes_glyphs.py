"""The glyphs few-shot table: every learner of the background scripts, scored on the same 600 fixed
episodes of the evaluation scripts (5- and 20-way, 1 and 5 shots), over seeds.

  python -m experiments.train --config=experiments/configs/episodes_glyphs.py:learner=maml \
      --workdir=runs/glyphs/maml
  python -m experiments.sweep --config=experiments/configs/episodes_glyphs.py:sweep=table \
      --workdir=runs/glyphs_table [--parallel=2]
  python -m experiments.report --workdir=runs/glyphs_table

`learner=NAME` is that learner's own config, as the README's table ran it (docs/glyphs.md has the
figures):
  protonet     `protonet_glyphs.py` (20-way 1-shot training episodes, 3,000 steps);
  protonet60   the same with 60-way training episodes (Snell et al.'s Omniglot setting);
  protonet60r  60-way training episodes and rotated classes (`ways=60,rotations=4`), the first row;
  maml / fomaml / anil   `maml_glyphs.py` with that method (5-way 1-shot training episodes; the 5-way
             columns adapt on each test episode's support set, the 20-way ones are prototypes on the
             meta-learned backbone); MAML 10,000 steps, first-order MAML and ANIL 4,000;
  supervised / simclr / supcon   `represent_glyphs.py` with that method (glyph views for the
             contrastive ones; class-balanced batches for SupCon): prototypes on the frozen encoder;
  supcon_random   SupCon with random batches (`per_class=0`).
Sweep `table` runs each learner with seeds 0, 1, 2 and shows the raw-pixel prototypes of the same
episodes (no learning, no seed) as the first row; sweep `represent` does the same for the learners
of single images only (supervised, simclr, supcon, supcon_random: 12 runs of about 7 minutes on 2
cores):

  python -m experiments.sweep --config=experiments/configs/episodes_glyphs.py:sweep=represent \
      --workdir=runs/glyphs_represent
"""
from experiments.configs import maml_glyphs, protonet_glyphs, represent_glyphs
from experiments.configs.common import parse_arg
from jtl import sweep

LEARNERS = {  # learner -> (config module, its argument, the table's row)
    "protonet": (protonet_glyphs, None, "ProtoNet (20-way training episodes)"),
    "protonet60": (protonet_glyphs, "ways=60", "ProtoNet (60-way training episodes)"),
    "protonet60r": (protonet_glyphs, "ways=60,rotations=4",
                    "ProtoNet (60-way training episodes, rotated classes)"),
    "maml": (maml_glyphs, "method=maml", "MAML (second order)"),
    "fomaml": (maml_glyphs, "method=fomaml", "first-order MAML (4,000 steps)"),
    "anil": (maml_glyphs, "method=anil", "ANIL (4,000 steps)"),
    "supervised": (represent_glyphs, "method=supervised",
                   "cross-entropy encoder, prototypes on its features"),
    "simclr": (represent_glyphs, "method=simclr", "SimCLR (glyph views), prototypes on its features"),
    "supcon": (represent_glyphs, "method=supcon",
               "SupCon (glyph views, class-balanced batches), prototypes on its features"),
    "supcon_random": (represent_glyphs, "method=supcon,per_class=0",
                      "SupCon (glyph views, random batches), prototypes on its features"),
}
# Sweep `represent`: the encoders trained on single images, the contrastive goals' table.
REPRESENT = ("supervised", "simclr", "supcon", "supcon_random")
# Learners the table ran shorter than their config's 10,000 steps (README, docs/glyphs.md).
STEPS = {"fomaml": 4000, "anil": 4000}
SEEDS = (0, 1, 2)
CONFIG = "experiments/configs/episodes_glyphs.py"


def get_config(arg=None):
  a = parse_arg(arg, learner="protonet")
  if a.learner not in LEARNERS:
    raise ValueError(f"unknown learner {a.learner!r}; use one of {', '.join(LEARNERS)}")
  module, learner_arg, _ = LEARNERS[a.learner]
  c = module.get_config(learner_arg)
  c.total_steps = STEPS.get(a.learner, c.total_steps)
  c.checkpoint_every = c.total_steps  # 4 x 600 episodes per evaluation: the final checkpoint only
  return c


def metric(ways: int, shots: int, kind: str = "") -> str:
  return f"test/{ways}way{shots}shot{'_' + kind if kind else ''}_accuracy"


def get_sweep(name):
  """`table`: each learner over SEEDS, and the raw-pixel prototypes on the same episodes;
  `represent`: the same for the learners of `REPRESENT`."""
  sweeps = {"table": tuple(LEARNERS), "represent": REPRESENT}
  if name not in sweeps:
    raise ValueError(f"unknown sweep {name!r}; episodes_glyphs.py has: {', '.join(sweeps)}")
  learners = {learner: LEARNERS[learner][2] for learner in sweeps[name]}
  cells = [sweep.Cell("pixels", variant="raw-pixel prototypes (no learning)", kind="view",
                      of=f"{next(iter(learners))}_s{SEEDS[0]}",
                      rename={metric(n, k, "pixel"): metric(n, k)
                              for n, k in protonet_glyphs.EVAL_EPISODES})]
  cells += sweep.grid(CONFIG, {row: f"learner={learner}" for learner, row in learners.items()},
                      SEEDS, keys={row: learner for learner, row in learners.items()})
  return sweep.Sweep(name, cells, metrics=tuple(metric(n, k) for n, k in protonet_glyphs.EVAL_EPISODES),
                     title=("accuracy on 600 fixed episodes of the evaluation scripts (5 queries per "
                            "class), mean ± std over seeds; every learner saw only the background "
                            "scripts"))
