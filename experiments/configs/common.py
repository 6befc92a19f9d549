"""What every experiment config shares: the standard keys and `name=value` argument parsing.

Every key here is overridable on the command line as `--config.KEY=VALUE`; an unknown key is an error.
"""
from __future__ import annotations

import ast

import ml_collections
from ml_collections import config_dict

from jtl.data import default_data_config
from jtl.lora import default_config as default_lora_config
from jtl.optim import default_optim_config
from jtl.sharding import default_mesh_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`'mode=finetune,shots=5'` → ConfigDict over `defaults` (values parsed as Python literals)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {', '.join(defaults)}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


WEIGHT_FILES = (".npz", ".pt", ".pth", ".bin", ".safetensors")  # (jtl/pretrained reads these)


def init_from_source(c: ml_collections.ConfigDict, source: str) -> None:
  """`c.init_from` reads `source`, a weights file (by its suffix) or a run's workdir, all but the
  head (a new task's head starts fresh)."""
  is_file = str(source).endswith(WEIGHT_FILES)
  c.init_from.path = str(source) if is_file else None
  c.init_from.workdir = None if is_file else str(source)
  c.init_from.dont_load = ("params/head/.*",)


def base_config() -> ml_collections.ConfigDict:
  """Standard keys with defaults; experiment configs override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 250
  # The newest good checkpoints to keep (None: all); see jtl/keep.py. Typed `object` so that
  # `--config.keep_checkpoints=None` parses (an int field refuses it); jtl/config.py checks the value.
  c.keep_checkpoints = config_dict.FieldReference(3, field_type=object)
  c.checkpoint_initial = False  # also save step 0 (the init, e.g. a transferred model), to evaluate it
  c.checkpoint_verify = True  # read the newest checkpoint back before deleting older ones
  # A CRC-32 manifest per checkpoint, written before orbax commits it and checked before every
  # restore (a mismatch: the checkpoint is moved aside like a broken one). See docs/reliability.md.
  c.checkpoint_checksums = True
  # If every checkpoint of the workdir is damaged, the run stops (exit 2) rather than start over;
  # True: start over from step 0, the damaged checkpoints and metrics moved to before-restart-N/.
  c.restart_from_scratch = False
  # 0: stop at the first NaN/Inf loss or gradient. N > 0: refuse such updates, stop after N in a row.
  c.skip_nonfinite_updates = 0
  c.objective = "supervised"
  # Compute precision: float32, or bfloat16 (bf16 compute; params, optimizer state and losses f32).
  c.precision = "float32"
  # k > 1: each step averages the gradients of k micro-batches of batch_size / k (same update as one
  # batch, BatchNorm statistics aside; activation memory of one micro-batch).
  c.grad_accum_steps = 1
  # Persistent compilation cache directory; None: $JTL_COMPILATION_CACHE or ~/.cache/jtl/xla;
  # "none": off. See jtl/compile_cache.py.
  c.compilation_cache = config_dict.placeholder(str)
  c.label_smoothing = 0.0
  c.data = default_data_config()
  c.model = ml_collections.ConfigDict(dict(name="cnn_small", num_classes=10))
  c.optim = default_optim_config()
  # Rule table over params paths: which leaves train (first match wins). See jtl/masks.py. Or a
  # preset name: "head_only", "bitfit", "lora" (typed `object` so a config may assign either).
  c.trainable = config_dict.FieldReference(((".*", True),), field_type=object)
  # Phases in one run (LP-FT, gradual unfreezing): ((start_step, trainable_rules[, lr_mults]), ...);
  # each replaces `trainable` from its step on. Empty: one phase. See jtl/phases.py.
  c.phases = ()
  c.mesh = default_mesh_config()
  c.eval = ml_collections.ConfigDict(dict(splits=config_dict.placeholder(tuple),
                                          batch_size=config_dict.placeholder(int)))
  # Evaluators (jtl/evaluators): {name: dict(type=..., split=..., data=..., ...)}; empty = the
  # objective's metrics on each of eval.splits (default data.eval_split).
  c.evals = ml_collections.ConfigDict()
  # Transfer init from another run's checkpoint; workdir None = train from the fresh init.
  # Or from a weights file (`path`: .pt/.pth, .safetensors, .npz; torchvision, timm, big_vision or jtl
  # names; `format`: auto | torch | safetensors | npz). See jtl/pretrained.
  # `remap`: rows (target regex, source path template[, indices along the last axis]) load a leaf from
  # another path of the source, before dont_load applies: e.g. a 5-way head from 5 rows of a 10-way one
  # (`jtl.checkpoint.transfer_init`).
  c.init_from = ml_collections.ConfigDict(dict(
      workdir=config_dict.placeholder(str), step=config_dict.placeholder(int),
      path=config_dict.placeholder(str), format="auto", dont_load=("params/head/.*",), remap=()))
  # LoRA adapters (jtl/lora.py): `rules` pick the Dense/Conv/attention kernels (matched against
  # params/.../kernel), `rank` 0 = off, update scale alpha/rank (alpha/sqrt(rank) with `rslora`).
  # Train them with trainable="lora"; loading a checkpoint without adapters needs
  # `.*/lora_[ab]` in init_from.dont_load.
  c.lora = default_lora_config()
  return c
