"""Evidence for the contrastive objectives: few-shot kNN / ridge probes on unseen digits, and
CLIP/SigLIP zero-shot and retrieval, next to raw pixels, a random encoder, supervised pretraining
and chance.

  python -m experiments.contrastive_table --workdir=/tmp/jtl/contrastive_table [--shots=1,2,5] \
      [--seeds=0,1,2] [--fresh]

Trains in-process (one device), reusing finished runs in --workdir: supervised pretraining
(`pretrain_digits.py`, the demo's source run), SimCLR and SupCon (`simclr_digits.py`,
`supcon_digits.py`), all on digits 0-4 with the same `cnn_small` encoder; CLIP and SigLIP
(`clip_digits.py`) on all ten digits and their training caption templates. Then, for each encoder
(and raw pixels: the same kNN / ridge on the 64 flattened pixels), the few-shot protocol: a kNN bank
and a ridge probe fitted on K labelled examples per class of digits 5-9 (`shots_seed` draws which),
scored on every test digit of 5-9, mean (min-max) over the seeds. Every number comes from the
representation evaluators (`jtl/evaluators/representation.py`), the raw-pixel row from the same
functions. Prints Markdown tables.
"""
from __future__ import annotations

import math
import time

import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath

from experiments.configs import clip_digits, pretrain_digits, simclr_digits, supcon_digits
from jtl import checkpoint, evaluate, train
from jtl.data import pipeline
from jtl.evaluators import representation as rep

flags.DEFINE_string("workdir", "/tmp/jtl/contrastive_table", "Where the runs go (reused if done).")
flags.DEFINE_list("shots", ["1", "2", "5"], "Labelled examples per class of digits 5-9.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "shots_seed values (which examples are labelled).")
flags.DEFINE_bool("fresh", False, "Delete earlier runs in --workdir first.")
FLAGS = flags.FLAGS

TARGET = simclr_digits.TARGET_CLASSES
ENCODERS = {  # row name -> config factory (None: the encoder at its random init)
    "supervised (CE on 0-4)": pretrain_digits.get_config,
    "SimCLR (0-4)": simclr_digits.get_config,
    "SupCon (0-4)": supcon_digits.get_config,
}
TWO_TOWERS = {"CLIP (softmax)": "loss=softmax", "SigLIP (sigmoid)": "loss=sigmoid"}


def trained(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  """Trains (or resumes / reuses) a run on one device and returns its final variables."""
  config.mesh.axes = (("data", 1),)
  evals = config.evals
  config.evals = ml_collections.ConfigDict()  # evaluated below, not during training
  start = time.time()
  train.train(config, str(workdir))
  config.evals = evals
  print(f"{workdir.name}: trained (or found) in {time.time() - start:.0f}s", flush=True)
  return checkpoint.load_variables(workdir)[1]


def few_shot_evals(shots: list[int], seeds: list[int]) -> ml_collections.ConfigDict:
  evals = {}
  for k in shots:
    for seed in seeds:
      target = dict(labels=TARGET, shots=k, shots_seed=seed)
      evals[f"knn_{k}_{seed}"] = dict(type="knn", data=target, tag=f"{k}_{seed}")
      evals[f"probe_{k}_{seed}"] = dict(type="linear_probe", data=target, tag=f"{k}_{seed}")
  evals["knn_source"] = dict(type="knn", data=dict(labels=simclr_digits.SOURCE_CLASSES), tag="src")
  evals["probe_source"] = dict(type="linear_probe", data=dict(labels=simclr_digits.SOURCE_CLASSES),
                               tag="src")
  return ml_collections.ConfigDict(evals)


def encoder_scores(config: ml_collections.ConfigDict, variables: dict | None, shots, seeds) -> dict:
  """`{(probe, k, seed): accuracy}` (k = 'src' for the source classes) through the evaluators."""
  config.evals = few_shot_evals(shots, seeds)
  s, evaluators = evaluate.setup_for_eval(config)
  if variables is None:
    params, model_state = train.fresh_variables(s)
  else:
    params, model_state = variables["params"], variables["model_state"]
  scores = {}
  for evaluator in evaluators:
    for key, value in evaluator.run(params, model_state):
      _, tag, metric = key.split("/")
      k, _, seed = tag.partition("_")
      scores[(metric.replace("_accuracy", ""), k, seed)] = value
  return scores


def pixel_scores(shots, seeds) -> dict:
  """The same kNN and ridge probe on flattened pixels in [0, 1]."""
  base = simclr_digits.get_config().data

  def pixels(overrides, split):
    c = base.copy_and_resolve_references()
    c.update(overrides)
    images, targets = pipeline.load_in_memory(c, split)
    return images.reshape(len(images), -1).astype(np.float32) / 255.0, targets["label"]

  scores = {}
  runs = [(str(k), str(seed), dict(labels=TARGET, shots=k, shots_seed=seed))
          for k in shots for seed in seeds]
  runs.append(("src", "", dict(labels=simclr_digits.SOURCE_CLASSES)))
  for k, seed, overrides in runs:
    train_x, train_y = pixels(overrides, "train")
    x, y = pixels(overrides, "test")
    scores[("knn", k, seed)] = rep.knn_accuracy(train_x, train_y, x, y, num_classes=5)
    scores[("linear_probe", k, seed)] = rep.linear_probe_accuracy(train_x, train_y, x, y,
                                                                  num_classes=5)
  return scores


def cell(values: list[float]) -> str:
  return f"{np.mean(values):.3f} ({min(values):.2f}–{max(values):.2f})"


def recall_chance(query_counts: np.ndarray, relevant: np.ndarray, gallery: int, k: int) -> float:
  """Expected Recall@k of a random ranking: 1 - C(M - r, k) / C(M, k), averaged over queries."""
  return float(np.sum(query_counts * [1 - math.comb(gallery - r, k) / math.comb(gallery, k)
                                      for r in relevant]) / np.sum(query_counts))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = epath.Path(FLAGS.workdir)
  if FLAGS.fresh and root.exists():
    root.rmtree()
  start = time.time()
  shots, seeds = [int(k) for k in FLAGS.shots], [int(s) for s in FLAGS.seeds]

  rows = {"raw pixels": pixel_scores(shots, seeds),
          "random init (cnn_small)": encoder_scores(simclr_digits.get_config(), None, shots, seeds)}
  for name, get_config in ENCODERS.items():
    config = get_config()
    variables = trained(config, root / name.split()[0].lower())
    rows[name] = encoder_scores(config, variables, shots, seeds)

  print(f"\nfew-shot on unseen digits 5-9: bank / probe fitted on K labelled examples per class, "
        f"scored on every test digit of 5-9; mean (min–max) over shots_seed "
        f"{','.join(FLAGS.seeds)}")
  header = [f"kNN {k}" for k in shots] + [f"ridge {k}" for k in shots] + ["kNN / ridge on 0-4"]
  print("\n| encoder | " + " | ".join(header) + " |\n|---|" + "---|" * len(header))
  for name, scores in rows.items():
    cells = [cell([scores[(probe, str(k), str(s))] for s in seeds])
             for probe in ("knn", "linear_probe") for k in shots]
    source = f"{scores[('knn', 'src', '')]:.3f} / {scores[('linear_probe', 'src', '')]:.3f}"
    print(f"| {name} | " + " | ".join(cells) + f" | {source} |", flush=True)

  print("\ntwo towers on all ten digits; test split, 4 held-out caption templates; relevant = "
        "same class")
  pairs = [(d, k) for d in ("i2t", "t2i") for k in (1, 5, 10)]
  keys = ["zero_shot_accuracy"] + [f"retrieval_{d}_r{k}" for d, k in pairs]
  print("\n| model | zero-shot acc | " + " | ".join(f"{d} R@{k}" for d, k in pairs) + " |")
  print("|---|" + "---|" * len(keys))
  results = {}
  for name, arg in TWO_TOWERS.items():
    config = clip_digits.get_config(arg)
    variables = trained(config, root / name.split()[0].lower())
    s, evaluators = evaluate.setup_for_eval(config)
    results[name] = {k.split("/", 1)[1]: v for e in evaluators
                     for k, v in e.run(variables["params"], variables["model_state"])}
  labels = pipeline.load_in_memory(config.data.copy_and_resolve_references(), "test")[1]["label"]
  counts = np.bincount(labels, minlength=10)
  prompts = len(s.objective.held_out_templates)
  chance = {"zero_shot_accuracy": 1 / len(counts)}  # a random guess is right 1 time in C
  for k in (1, 5, 10):
    chance[f"retrieval_i2t_r{k}"] = recall_chance(counts, [prompts] * 10, 10 * prompts, k)
    chance[f"retrieval_t2i_r{k}"] = recall_chance(np.full(10, prompts), counts, int(counts.sum()),
                                                  k)
  for name, values in {"chance": chance, **results}.items():
    print(f"| {name} | " + " | ".join(f"{values[k]:.3f}" for k in keys) + " |")
  print(f"\ntotal time: {time.time() - start:.0f}s")


if __name__ == "__main__":
  app.run(main)
