"""Few-shot transfer on the digits, swept: modes × shots × draws of the labelled examples.

  python -m experiments.transfer_table --workdir=/tmp/jtl/table [--shots=1,2,5] [--seeds=0,1,2]

Pretrains twice: on handwritten digits 0–4 (`pretrain_digits.py`) and on handwritten 0–4 plus printed
0–9 (`pretrain_mixed_digits.py`, the demo's source). Then, on digits 5–9, it scores the raw-pixel
baselines (`jtl/baselines.py`, on the same labelled examples and test split) and trains each
variant of transfer_digits.py in-process, and prints a Markdown table of mean (min–max) test accuracy.
The README's transfer table comes from it.
"""
import numpy as np
from absl import app, flags, logging
from etils import epath

from experiments.configs import pretrain_digits, pretrain_mixed_digits, transfer_digits
from jtl import baselines, evaluate, train
from jtl.metric_writer import read_jsonl

flags.DEFINE_string("workdir", "/tmp/jtl/transfer_table", "Where the runs go (reused if present).")
flags.DEFINE_list("shots", ["1", "2", "5"], "Labelled examples per class.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "shots_seed values (which examples are labelled).")
FLAGS = flags.FLAGS

SOURCES = {  # name -> (pretraining config, the eval metric that scores it)
    "handwritten": (pretrain_digits, "test/accuracy"),
    "mixed": (pretrain_mixed_digits, "test/handwritten/accuracy"),
}
VARIANTS = {  # name -> (source, transfer_digits.py arguments); source None: no pretraining
    "scratch": (None, "mode=scratch"),
    "linear_probe": ("handwritten", "mode=linear_probe"),
    "finetune (old default)": ("handwritten", "mode=finetune"),
    "finetune, backbone lr x0.1": ("handwritten", "mode=finetune,backbone_lr=0.1"),
    "finetune, backbone lr x0.3": ("handwritten", "mode=finetune,backbone_lr=0.3"),
    "finetune, top stage re-initialised": ("handwritten", "mode=finetune,reinit_stages=1"),
    "mixed source: linear_probe": ("mixed", "mode=linear_probe"),
    "mixed source: finetune": ("mixed", "mode=finetune"),
    "mixed source: finetune, backbone lr x0.3 (old demo)": ("mixed", "mode=finetune,backbone_lr=0.3"),
    "mixed source: linear_probe, printed head": ("mixed", "mode=linear_probe,head=printed"),
    "mixed source: finetune, BN frozen": ("mixed", "mode=finetune,bn=frozen"),
    "mixed source: finetune, printed head": ("mixed", "mode=finetune,head=printed"),
    "mixed source: finetune, printed head, BN frozen (demo)": ("mixed", transfer_digits.DEMO_RECIPE),
}
# Step 0 of the demo's runs: the printed head's rows 5-9 on the pretrained backbone, no target step.
ZERO_SHOT = "mixed source: zero-shot (printed head, step 0 of the demo's runs)"


def accuracy(config, workdir: epath.Path, key: str = "test/accuracy", step: int | None = None
             ) -> float:
  """`key` at `step` (default: the last) of the run in `workdir`, trained and evaluated if need be."""
  config.mesh.axes = (("data", 1),)
  train.train(config, str(workdir))
  evaluate.evaluate_checkpoints(config, str(workdir))
  rows = read_jsonl(workdir / "eval_metrics.jsonl")
  return rows[-1][key] if step is None else next(r[key] for r in rows if r["step"] == step)


def cell(accs: list[float]) -> str:
  return f"{np.mean(accs):.3f} ({min(accs):.2f}–{max(accs):.2f})"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = epath.Path(FLAGS.workdir)
  shots = [int(k) for k in FLAGS.shots]
  seeds = [int(s) for s in FLAGS.seeds]
  pretrained = {}
  for name, (module, key) in SOURCES.items():
    pretrained[name] = root / f"pretrain_{name}"
    print(f"pretrain {name}: digits 0-4 test accuracy "
          f"{accuracy(module.get_config(), pretrained[name], key):.3f}", flush=True)

  def target_config(args: str, k: int, seed: int, source: str | None):
    pretrain = pretrained[source] if source else "none"
    config = transfer_digits.get_config(f"{args},shots={k},pretrain={pretrain}")
    config.data.shots_seed = seed
    return config

  print("\n| target 5-9, test accuracy | " + " | ".join(f"{k} shot{'s' * (k > 1)}" for k in shots) + " |")
  print("|---|" + "---|" * len(shots))
  pixels = {name: [] for name in baselines.NAMES}
  for k in shots:
    per_seed = [baselines.pixel_baselines(target_config("mode=scratch", k, s, None).data)
                for s in seeds]
    for name in baselines.NAMES:
      pixels[name].append(cell([r[name] for r in per_seed]))
  for name, cells in pixels.items():
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
  def run_cells(source: str | None, args: str, step: int | None = None) -> list[str]:
    return [cell([accuracy(target_config(args, k, s, source),
                           root / f"{source or 'none'}_{args.replace(',', '_')}_k{k}_s{s}", step=step)
                  for s in seeds]) for k in shots]
  for name, (source, args) in VARIANTS.items():
    print(f"| {name} | " + " | ".join(run_cells(source, args)) + " |", flush=True)
  print(f"| {ZERO_SHOT} | " + " | ".join(run_cells("mixed", transfer_digits.DEMO_RECIPE, step=0))
        + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
