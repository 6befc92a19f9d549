"""experiments/bench/vs_pytorch: argument handling and the jtl side always; the PyTorch side only
where torch is installed (it is the benchmark-only extra `.[bench]`, never needed by `make test`)."""
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.bench import torch_models, vs_pytorch

# Runs the benchmark's main with torch hidden (an import of it fails) and the given arguments.
HIDDEN_TORCH_MAIN = """
import sys
sys.modules["torch"] = None
from absl import app
from experiments.bench import vs_pytorch
vs_pytorch.define_flags()
sys.argv = ["vs_pytorch"] + sys.argv[1:]
app.run(vs_pytorch.main)
"""


def run_main_without_torch(*args):
  return subprocess.run([sys.executable, "-c", HIDDEN_TORCH_MAIN, *args], capture_output=True,
                        text=True, timeout=120, check=False)


def test_parse_models():
  assert vs_pytorch.parse_models(["vit", " mlp"]) == ("vit", "mlp")
  with pytest.raises(ValueError, match="resnet18"):
    vs_pytorch.parse_models(["mlp", "resnet"])
  with pytest.raises(ValueError):
    vs_pytorch.parse_models([])


def test_missing_torch_is_one_line_naming_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(SystemExit, match=r"pip install -e \.\[bench\]"):
    vs_pytorch.require_torch()
  proc = run_main_without_torch("--models=mlp")
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "pip install -e .[bench]" in last and "Traceback" not in proc.stderr


def test_bad_arguments_stop_before_torch_is_needed():
  proc = run_main_without_torch("--models=mlp,resnet")
  assert proc.returncode != 0
  assert "--models takes a comma-separated subset of mlp,cnn,resnet18,vit" in proc.stderr
  proc = run_main_without_torch("--batch=0")
  assert proc.returncode != 0 and "--batch must be >= 1" in proc.stderr


def test_jtl_side_runs_the_real_step():
  side = vs_pytorch.JtlSide("mlp", vs_pytorch.make_batch(8, 8))
  side.compile()
  assert side.flops > 2 * 8 * side.num_params  # XLA's count: more than the forward matmuls
  metrics = side.run(2)
  assert int(side.state.step) == 2 and np.isfinite(float(metrics["loss"]))
  assert side.num_params == 3 * 8 * 8 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def test_interleaved_sizes_rounds_by_time():
  class Side:
    def __init__(self, step_s):
      self.step_s, self.steps = step_s, 0

    def run(self, n):
      self.steps += n
      end = time.perf_counter() + n * self.step_s
      while time.perf_counter() < end:
        pass

  rates, counts = vs_pytorch.interleaved({"fast": Side(0.001), "slow": Side(0.01)}, rounds=3,
                                         steps=0, round_s=0.02)
  assert counts["fast"] > counts["slow"] >= 1
  assert rates["fast"] > rates["slow"]


@pytest.mark.parametrize("name", vs_pytorch.MODELS)
def test_torch_mirror_has_jtl_parameter_count(name):
  torch = pytest.importorskip("torch")
  import jax
  from jtl import train

  batch = vs_pytorch.make_batch(2, 32)
  s = train.setup(vs_pytorch.jtl_config(name, 2), batch)
  jtl_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_state.params))
  torch_side = torch_models.TorchSide(torch, name, batch)
  assert torch_side.num_params == jtl_count


# The README's tolerance: logits equal within 2e-6 after loading the same weights.
PARITY_TOLERANCE = 2e-6


# vit and resnet18 (a minute together on 2 busy cores) in `make test-all`; mlp and cnn in CI too.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("vit", "resnet18")
                                  else n for n in vs_pytorch.MODELS])
def test_torch_step_and_same_function(name):
  torch = pytest.importorskip("torch")
  batch = vs_pytorch.make_batch(4, 8)
  jtl_side = vs_pytorch.JtlSide(name, batch)
  torch_side = torch_models.TorchSide(torch, name, batch)
  assert vs_pytorch.max_logit_difference(torch, name, jtl_side, torch_side) < PARITY_TOLERANCE
  metrics = torch_side.run(2)
  assert np.isfinite(float(metrics["loss"])) and torch_side.sched.last_epoch == 2
