"""Benchmark: what checkpoint checksums cost, on saving and on restoring.

  python -m experiments.bench.checkpoint_integrity [--megabytes=64] [--leaves=24] [--rounds=3]

A TrainState-shaped tree of float32 arrays (params, and Adam's two moments: 3x the params) of
`--megabytes` in total is saved through `jtl.checkpoint` with checksums on and off (asynchronously,
as the trainer does, timed until the save is committed: `wait_until_finished`), then restored
onto one device with and without checking the manifest first. Rounds interleave the variants;
medians. The checksum work itself (CRC-32 over every file, `zlib`) is timed apart as MB/s. The last
line is one JSON object: `save_time_with_vs_without`, `restore_time_with_vs_without`,
`checksum_mb_per_s` and `megabytes`.
"""
from __future__ import annotations

import json
import tempfile
import time
from types import SimpleNamespace

import jax
import numpy as np
from absl import app, flags, logging

from jtl import checkpoint

flags.DEFINE_integer("megabytes", 64, "Total size of the saved state (params + 2 Adam moments).")
flags.DEFINE_integer("leaves", 24, "Arrays per part.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
FLAGS = flags.FLAGS


def make_state(megabytes: int, leaves: int) -> SimpleNamespace:
  per_leaf = max(megabytes * 2**20 // (3 * leaves * 4), 1)
  rng = np.random.default_rng(0)
  part = lambda: {f"layer_{i}": jax.device_put(rng.standard_normal(per_leaf, np.float32))
                  for i in range(leaves)}
  return SimpleNamespace(params=part(), model_state={}, opt_state={"mu": part(), "nu": part()})


def timed_save(workdir: str, state: SimpleNamespace, checksums: bool, step: int) -> float:
  mgr = checkpoint.manager(workdir, keep=None, checksums=checksums)
  start = time.perf_counter()
  checkpoint.save(mgr, step, state, force=True)
  mgr.wait_until_finished()
  seconds = time.perf_counter() - start
  mgr.close()
  return seconds


def timed_restore(workdir: str, state: SimpleNamespace, verify: bool, step: int) -> float:
  abstract = {name: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                 sharding=x.sharding),
                                 getattr(state, name)) for name in checkpoint.ITEMS}
  with checkpoint.manager(workdir, keep=None, async_save=False, create=False) as mgr:
    start = time.perf_counter()
    restored = checkpoint.restore(mgr, step, abstract, verify=verify)
    jax.block_until_ready(restored)
    return time.perf_counter() - start


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # (orbax logs every save at INFO)
  state = make_state(FLAGS.megabytes, FLAGS.leaves)
  size = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))) / 2**20
  times = {"save with": [], "save without": [], "restore with": [], "restore without": []}
  crc_rates = []
  with tempfile.TemporaryDirectory() as root:
    for r in range(FLAGS.rounds):
      for checksums in (True, False):
        workdir = f"{root}/{'on' if checksums else 'off'}"
        step = r + 1
        times[f"save {'with' if checksums else 'without'}"].append(
            timed_save(workdir, state, checksums, step))
      # Restore the checksummed checkpoint both ways (the same files; only the check differs).
      for verify in (True, False):
        times[f"restore {'with' if verify else 'without'}"].append(
            timed_restore(f"{root}/on", state, verify, r + 1))
      folder = checkpoint.checkpoint_dir(f"{root}/on") / str(r + 1)
      start = time.perf_counter()
      problem = checkpoint.checksum_problem(f"{root}/on", r + 1)
      crc_rates.append(size / (time.perf_counter() - start))
      assert problem is None, problem
      assert (folder / checkpoint.MANIFEST).exists()
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"state of {size:.0f} MiB ({3 * FLAGS.leaves} float32 arrays), {FLAGS.rounds} interleaved "
        f"rounds, medians; {jax.devices()[0].platform} device")
  print(f"{'':<10}{'checksums on s':>16}{'off s':>10}{'on/off':>8}")
  for what in ("save", "restore"):
    on, off = med[f"{what} with"], med[f"{what} without"]
    print(f"{what:<10}{on:>16.3f}{off:>10.3f}{on / off:>8.2f}")
  rate = float(np.median(crc_rates))
  print(f"checking a manifest (CRC-32 of every file, from the page cache): {rate:.0f} MiB/s")
  print(json.dumps({
      "save_time_with_vs_without": round(med["save with"] / med["save without"], 3),
      "restore_time_with_vs_without": round(med["restore with"] / med["restore without"], 3),
      "checksum_mb_per_s": round(rate, 1), "megabytes": round(size, 1)}))


if __name__ == "__main__":
  app.run(main)
