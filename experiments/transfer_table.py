"""Few-shot transfer on the digits, swept: modes × shots × draws of the labelled examples.

  python -m experiments.transfer_table --workdir=/tmp/jtl/table [--shots=1,2,5] [--seeds=0,1,2]

Pretrains once (digits 0–4), then trains each mode of transfer_digits.py on digits 5–9 in-process and
prints a Markdown table of mean (min–max) test accuracy. The README's transfer table comes from it.
"""
import numpy as np
from absl import app, flags, logging
from etils import epath

from experiments.configs import pretrain_digits, transfer_digits
from jtl import evaluate, train
from jtl.metric_writer import read_jsonl

flags.DEFINE_string("workdir", "/tmp/jtl/transfer_table", "Where the runs go (reused if present).")
flags.DEFINE_list("shots", ["1", "2", "5"], "Labelled examples per class.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "shots_seed values (which examples are labelled).")
FLAGS = flags.FLAGS

VARIANTS = {  # name -> transfer_digits.py arguments
    "scratch": "mode=scratch",
    "linear_probe": "mode=linear_probe",
    "finetune (default)": "mode=finetune",
    "finetune, backbone lr x0.1": "mode=finetune,backbone_lr=0.1",
    "finetune, top stage re-initialised": "mode=finetune,reinit_stages=1",
}


def accuracy(config, workdir: epath.Path) -> float:
  config.mesh.axes = (("data", 1),)
  train.train(config, str(workdir))
  evaluate.evaluate_checkpoints(config, str(workdir))
  return read_jsonl(workdir / "eval_metrics.jsonl")[-1]["test/accuracy"]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = epath.Path(FLAGS.workdir)
  pretrain = root / "pretrain"
  print(f"pretrain (digits 0-4) test accuracy: {accuracy(pretrain_digits.get_config(), pretrain):.3f}")
  shots = [int(k) for k in FLAGS.shots]
  print("\n| target 5-9, test accuracy | " + " | ".join(f"{k} shot{'s' * (k > 1)}" for k in shots) + " |")
  print("|---|" + "---|" * len(shots))
  for name, args in VARIANTS.items():
    cells = []
    for k in shots:
      accs = []
      for seed in FLAGS.seeds:
        config = transfer_digits.get_config(f"{args},shots={k},pretrain={pretrain}")
        config.data.shots_seed = int(seed)
        accs.append(accuracy(config, root / f"{args.replace(',', '_')}_k{k}_s{seed}"))
      cells.append(f"{np.mean(accs):.3f} ({min(accs):.2f}–{max(accs):.2f})")
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
