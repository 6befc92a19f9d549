"""XLA's own convolution and max-pool against jtl's CPU formulations (jtl/models/cpu_ops.py), op by op.

  python -m experiments.bench.cpu_ops [--rounds=5] [--round_s=0.3] [--batch=32]

For each case, forward + backward (the gradients a train step needs: input and kernel for a conv,
input for a pool) of the XLA op and of the alternative formulation, jitted, timed in interleaved
rounds, medians compared: `speed-up` = XLA ms / alternative ms. `route` says what `cpu_ops` does
by default (a convolution becomes a matmul when its output map has at most `cpu_ops.SMALL_MAP`
pixels; one whose input channels are not a multiple of 4 is padded where cpu_ops measured that
faster; every max-pool becomes slices). The `_padded` cases compare XLA's convolution with the same
convolution on channel-padded input instead of the matmul. The convolution cases are the
shapes of `cnn_small` and ResNet-18 at 32x32 input, batch 32, plus cases on either side of the rule;
`GFLOP/s` and `peak` are each op's achieved FLOP/s and its fraction of the matmul peak measured after
the rounds, both sides counted with the compiled FLOPs of the matmul form (its taps that read only
padding are skipped, so this is the arithmetic the convolution needs). `max|diff|` compares the two outputs and
gradients. Op by op is not the whole story (the matmul form also wins in isolation on the larger maps
of `cnn_small`, but not inside a whole step), so `--steps` also times the real jtl train step of
each model three ways: XLA's ops (`model.cpu_fast_paths=False`), jtl's default, and every convolution as a
matmul. The last line is one JSON object: `<case>_speedup` per case, and per model
`<model>_step_xla_vs_default` and `<model>_step_all_matmul_vs_default` (ratios of ms per step;
> 1: the default is faster).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from experiments.bench import roofline
from jtl.models import cpu_ops

flags.DEFINE_integer("rounds", 5, "Interleaved timed rounds (the median is kept).")
flags.DEFINE_float("round_s", 0.3, "Target seconds per variant and round.")
flags.DEFINE_integer("batch", 32, "Batch size of every case.")
flags.DEFINE_list("steps", ["cnn", "resnet18"], "Models whose whole train step is also timed "
                  "(vs_pytorch's names: mlp, cnn, resnet18, vit); empty: none.")
FLAGS = flags.FLAGS

NHWC = ("NHWC", "HWIO", "NHWC")
# name: (H = W, C_in, C_out, kernel, stride, padding) of a convolution.
CONVS = {
    "cnn_small_conv1_32x32_3to32": (32, 3, 32, 3, 1, 1),
    "cnn_small_conv2_16x16_32to64": (16, 32, 64, 3, 1, 1),
    "cnn_small_conv3_8x8_64to128": (8, 64, 128, 3, 1, 1),
    "resnet18_stage3_4x4_128to256_s2": (4, 128, 256, 3, 2, 1),
    "resnet18_stage3_2x2_256to256": (2, 256, 256, 3, 1, 1),
    "resnet18_stage4_2x2_256to512_s2": (2, 256, 512, 3, 2, 1),
    "resnet18_stage4_1x1_512to512": (1, 512, 512, 3, 1, 1),
    "resnet18_stage2_4x4_128to128": (4, 128, 128, 3, 1, 1),
    "resnet18_stage1_8x8_64to64": (8, 64, 64, 3, 1, 1),
}
# Input channels not a multiple of 4: XLA's conv against the same conv on channel-padded input.
PADDED_CONVS = {
    "cnn_small_conv1_3to32_padded": (32, 3, 32, 3, 1, 1),
    "rgb_3to64_padded": (32, 3, 64, 3, 1, 1),
    "gray_1to32_padded": (32, 1, 32, 3, 1, 1),
}
# name: (H = W, C, window, stride, padding) of a max-pool.
POOLS = {
    "cnn_small_pool_32x32x32": (32, 32, 2, 2, 0),
    "resnet18_stem_pool_16x16x64": (16, 64, 3, 2, 1),
}


def _conv_case(spec: tuple[int, ...], batch: int, rng: np.random.Generator, padded: bool = False):
  """`padded`: the alternative is the channel-padded conv, not the matmul."""
  h, c_in, c_out, k, s, p = spec
  x = jnp.asarray(rng.normal(size=(batch, h, h, c_in)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)) / np.sqrt(k * k * c_in), jnp.float32)
  pads = [(p, p), (p, p)]
  xla = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pads, dimension_numbers=NHWC)  # noqa: E731
  alt = lambda x, w: cpu_ops.conv_as_matmul(x, w, (s, s), pads)  # noqa: E731
  if padded:
    alt = lambda x, w: xla(*cpu_ops.pad_channels(x, w))  # noqa: E731
  out = (h + 2 * p - k) // s + 1
  route = "matmul" if out * out <= cpu_ops.SMALL_MAP else "xla"
  if route == "xla" and c_in % cpu_ops.CHANNEL_MULTIPLE and cpu_ops._padding_channels_pays(  # noqa: SLF001
      x, w, (s, s), pads):
    route = "padded"
  return xla, alt, (x, w), True, route


def _pool_case(spec: tuple[int, ...], batch: int, rng: np.random.Generator):
  h, c, k, s, p = spec
  x = jnp.asarray(rng.normal(size=(batch, h, h, c)), jnp.float32)
  pads = ((p, p), (p, p))
  xla = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, s, s, 1),  # noqa: E731
                                    ((0, 0),) + pads + ((0, 0),))
  alt = lambda x: cpu_ops.max_pool_as_slices(x, (k, k), (s, s), pads)  # noqa: E731
  return xla, alt, (x,), False, "slices"


def _fwd_bwd(f: Callable) -> Callable:
  """jit of (*args, r) -> (f(*args), the gradients of sum(f(*args) * r) for every argument)."""
  def run(*args):
    *inputs, cotangent = args
    out, vjp = jax.vjp(f, *inputs)
    return (out,) + vjp(cotangent)
  return jax.jit(run)


def _median_ms(fns: dict[str, Callable], args: Sequence, rounds: int, round_s: float) -> dict:
  """Interleaved rounds: each variant runs for about `round_s` per round; median ms per call."""
  for f in fns.values():
    jax.block_until_ready(f(*args))
  calls = {}
  for name, f in fns.items():  # calibrate the calls per round
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < round_s / 3 or n < 2:
      jax.block_until_ready(f(*args))
      n += 1
    calls[name] = max(1, int(3 * n))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, f in fns.items():
      start = time.perf_counter()
      for _ in range(calls[name]):
        jax.block_until_ready(f(*args))
      times[name].append((time.perf_counter() - start) / calls[name] * 1e3)
  return {name: float(np.median(t)) for name, t in times.items()}


STEP_VARIANTS = {  # name: (the model option cpu_fast_paths, SMALL_MAP)
    "xla ops": (False, cpu_ops.SMALL_MAP),
    "jtl default": (True, cpu_ops.SMALL_MAP),
    "every conv a matmul": (True, 10 ** 9),
}


def whole_steps(model: str, batch: int, rounds: int, round_s: float) -> dict[str, float]:
  """ms per real jtl train step (vs_pytorch's setup: AdamW, 32x32x3) under each STEP_VARIANTS."""
  from experiments.bench.vs_pytorch import JtlSide, jtl_config, make_batch  # noqa: PLC0415
  batch_np, sides = make_batch(batch, 32), {}
  for name, (on, small_map) in STEP_VARIANTS.items():
    default, cpu_ops.SMALL_MAP = cpu_ops.SMALL_MAP, small_map
    try:  # (SMALL_MAP is read when the step is traced, i.e. compiled)
      side = JtlSide(model, batch_np, model_options={"cpu_fast_paths": on})
      side.compile()
    finally:
      cpu_ops.SMALL_MAP = default
    sides[name] = side
  from jtl import models  # noqa: PLC0415
  default_model = models.build(jtl_config(model, batch).model)
  assert default_model.backbone.fast_paths.enabled  # the default the middle row stands for
  fns = {name: (lambda side=side: side.run(1)) for name, side in sides.items()}
  return _median_ms(fns, (), rounds, round_s)


def main(argv: Sequence[str]) -> None:
  del argv
  rng = np.random.default_rng(0)
  cases = {name: _conv_case(spec, FLAGS.batch, rng) for name, spec in CONVS.items()}
  cases.update({name: _conv_case(spec, FLAGS.batch, rng, padded=True)
                for name, spec in PADDED_CONVS.items()})
  cases.update({name: _pool_case(spec, FLAGS.batch, rng) for name, spec in POOLS.items()})
  rows = []
  for name, (xla, alt, args, count_flops, route) in cases.items():
    out = jax.eval_shape(xla, *args)
    args = (*args, jnp.asarray(rng.normal(size=out.shape), out.dtype))
    fx, fa = _fwd_bwd(xla), _fwd_bwd(alt)
    flops = roofline.compiled_flops(fa, *args) if count_flops else 0
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(fx(*args), fa(*args)))
    ms = _median_ms({"xla": fx, "alt": fa}, args, FLAGS.rounds, FLAGS.round_s)
    rows.append((name, ms["xla"], ms["alt"], flops, route, diff))
    print(f"# {name}: xla {ms['xla']:.2f} ms, alternative {ms['alt']:.2f} ms", flush=True)
  peak = roofline.matmul_peak()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {FLAGS.batch}, fwd+bwd, "
        f"medians of {FLAGS.rounds} interleaved rounds; matmul peak {peak / 1e9:.0f} GFLOP/s")
  print(f"{'case':<34}{'xla ms':>9}{'alt ms':>9}{'speed-up':>9}{'route':>8}"
        f"{'xla GFLOP/s':>12}{'alt GFLOP/s':>12}{'xla peak':>9}{'alt peak':>9}{'max|diff|':>10}")
  for name, t_xla, t_alt, flops, route, diff in rows:
    rates = [f"{flops / t / 1e6:>12.1f}" if flops else f"{'':>12}" for t in (t_xla, t_alt)]
    fracs = [f"{roofline.fraction(flops, t / 1e3, peak):>9.3f}" if flops else f"{'':>9}"
             for t in (t_xla, t_alt)]
    print(f"{name:<34}{t_xla:>9.2f}{t_alt:>9.2f}{t_xla / t_alt:>9.2f}{route:>8}"
          f"{rates[0]}{rates[1]}{fracs[0]}{fracs[1]}{diff:>10.1e}")
  figures = {f"{name}_speedup": round(t_xla / t_alt, 3) for name, t_xla, t_alt, *_ in rows}
  for model in FLAGS.steps:
    ms = whole_steps(model, FLAGS.batch, FLAGS.rounds, FLAGS.round_s)
    print(f"{model} train step (batch {FLAGS.batch}): " + ", ".join(
        f"{name} {t:.1f} ms" for name, t in ms.items()))
    figures[f"{model}_step_xla_vs_default"] = round(ms["xla ops"] / ms["jtl default"], 3)
    figures[f"{model}_step_all_matmul_vs_default"] = round(
        ms["every conv a matmul"] / ms["jtl default"], 3)
  figures["matmul_peak_gflops"] = round(peak / 1e9, 1)
  print(json.dumps(figures))


if __name__ == "__main__":
  app.run(main)
