"""Faster formulations of operations XLA:CPU runs slowly in CNNs: small-map convolutions, some
convolutions of few input channels, and the max-pool backward pass.

Measured on this project's 2-core CPU (`python -m experiments.bench.cpu_ops`):
  - **Convolutions on maps of a few pixels.** A 3x3 conv on a 2x2 map (B=32, 256->256 channels,
    0.15 GFLOP) takes 22-24 ms forward and 22 ms backward in XLA's kernel, 20-40x what the same
    arithmetic takes as a matmul; ResNet-18 at 32x32 input runs its last two stages on 2x2 and 1x1
    maps. On such maps the convolution is computed as im2col: the input taps that can touch the image
    (strided slices of the padded input; taps that only read padding are skipped, so a 3x3 conv on a
    1x1 map is one matmul with the centre tap) are concatenated along channels and multiplied by the
    reshaped kernel. Autodiff gives the backward as two matmuls and a pad-and-add. The im2col copy is
    k*k times the (tiny) input. From 8x8 maps on XLA's kernels are kept: in whole train steps
    they are faster (there the im2col copy, kept for the backward pass, no longer fits in cache).
  - **Input channels not a multiple of 4** (an RGB stem). XLA's kernel for some such shapes is
    erratic: 3->32 channels at 32x32, B=32, takes 2.7 ms forward where 3->64 takes 1.3 ms, and
    padding the input to 4 channels (zero channels, zero kernel rows: the same convolution) brings
    it to 1.0 ms; for 3->16, 3->64, or 1-channel inputs padding is slower. Since no fixed rule
    fits, each such shape is timed both ways (forward plus both gradients) when a model is first
    traced, and padded only if that is at least PAD_GAIN times faster. cnn_small's step: -7%.
  - **Max-pool backward.** `nn.max_pool`'s gradient is XLA's select-and-scatter, 6.4 ms for a 2x2
    pool of a 32x32x32 map at B=32 (fwd+bwd) against 0.34 ms for the same pool written as the
    elementwise maximum of its k*k strided slices, with a gradient of elementwise selects that gives
    each window's cotangent to its first maximal input, as select-and-scatter (and PyTorch) does.

Inside a loop body (`lax.scan`: gradient accumulation) every convolution is a matmul: XLA:CPU's
convolutions run far slower inside loops (FastPaths.every_conv).

All agree with XLA's operations to float32 rounding. Which a model takes is its own setting, never a
global: conv models carry a `fast_paths: FastPaths` field, set from their config option
`model.cpu_fast_paths` (default True: on when the model is traced for the CPU backend; False: XLA's
operations everywhere), and pass `fast_paths.conv_general_dilated` to `nn.Conv` (its
`conv_general_dilated` field, so parameter names and checkpoints are unchanged) and call
`fast_paths.max_pool` for `nn.max_pool`. See docs/seams.md.
"""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jtl.errors import ConfigError

SMALL_MAP = 16  # output pixels (H_out * W_out) at or below which a convolution becomes a matmul
CHANNEL_MULTIPLE = 4  # other input channel counts are tried zero-padded to a multiple of this
PAD_GAIN = 1.3  # ... and padded if that makes the convolution at least this much faster
_PAD_ROUNDS = 5
_PAD_CHOICES: dict[str, bool] = {}  # repr of (shapes, strides, pads, dtypes) -> pad or not
CHOICES_FILE = "jtl_cpu_conv_choices.json"
_choices_path: str | None = None
_NHWC = ("NHWC", "HWIO", "NHWC")
Pads = Sequence[tuple[int, int]]


def _pads(padding: str | Pads, in_hw: Sequence[int], k_hw: Sequence[int],
          strides: Sequence[int]) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return [tuple(p) for p in lax.padtype_to_pads(in_hw, k_hw, strides, padding)]
  return [tuple(p) for p in padding]


def _out_size(n: int, k: int, s: int, pad: tuple[int, int]) -> int:
  return (n + pad[0] + pad[1] - k) // s + 1


def _taps(xp: jnp.ndarray, k_hw: Sequence[int], strides: Sequence[int], out_hw: Sequence[int]):
  """(i, j, slice) for each window offset: xp[:, i + r*sh, j + c*sw] over the output grid."""
  (kh, kw), (sh, sw), (ho, wo) = k_hw, strides, out_hw
  b, _, _, c = xp.shape
  for i in range(kh):
    for j in range(kw):
      yield i, j, lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                            (1, sh, sw, 1))


def conv_as_matmul(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
                   padding: str | Pads, precision: Any = None,
                   preferred_element_type: Any = None) -> jnp.ndarray:
  """An NHWC x HWIO convolution computed as im2col and one matmul (values as XLA's conv)."""
  kh, kw, _, c_out = kernel.shape
  b, h, w, _ = x.shape
  pads = _pads(padding, (h, w), (kh, kw), strides)
  if min(min(p) for p in pads) < 0:
    raise ValueError(f"conv_as_matmul takes non-negative padding, got {pads}")
  out_hw = [_out_size(n, k, s, p) for n, k, s, p in zip((h, w), (kh, kw), strides, pads)]

  def reads_image(tap: int, axis: int) -> bool:
    pad, size, stride = pads[axis][0], (h, w)[axis], strides[axis]
    return any(pad <= tap + r * stride < pad + size for r in range(out_hw[axis]))

  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  used = [(t, kernel[i, j]) for i, j, t in _taps(xp, (kh, kw), strides, out_hw)
          if reads_image(i, 0) and reads_image(j, 1)]
  if not used:  # every tap reads padding only
    return jnp.zeros((b, *out_hw, c_out), preferred_element_type or jnp.result_type(x, kernel))
  cols = jnp.concatenate([t for t, _ in used], axis=-1)
  weights = jnp.concatenate([r for _, r in used], axis=0)
  return lax.dot_general(cols, weights, (((3,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def _is_plain_2d(lhs: jnp.ndarray, rhs: jnp.ndarray, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count: int, batch_group_count: int) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
    return False
  if any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())):
    return False
  return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


def pad_channels(lhs: jnp.ndarray, rhs: jnp.ndarray, multiple: int = 4):
  """NHWC input and HWIO kernel with the input channels zero-padded to a multiple of `multiple`
  (the convolution is unchanged: the extra channels and kernel rows are zero)."""
  extra = -lhs.shape[-1] % multiple
  return (jnp.pad(lhs, ((0, 0), (0, 0), (0, 0), (0, extra))),
          jnp.pad(rhs, ((0, 0), (0, 0), (0, extra), (0, 0))))


def _padding_channels_pays(lhs, rhs, strides: Sequence[int], pads: Pads) -> bool:
  """Whether XLA's convolution of these shapes runs at least PAD_GAIN times faster (forward plus
  both gradients) with its input channels padded to a multiple of CHANNEL_MULTIPLE. Measured when a
  model is first traced (~0.5 s per shape), once per shape and process, or once per shape for all
  processes that `remember_choices` the same directory. Never in a multi-host run: hosts timing
  on their own could trace different programs."""
  if jax.process_count() > 1:  # every host must trace the same program: no per-host timings
    return False
  key = (tuple(lhs.shape), tuple(rhs.shape), tuple(strides), tuple(map(tuple, pads)),
         str(lhs.dtype), str(rhs.dtype))
  name = repr(key)  # (the JSON file's keys)
  if name not in _PAD_CHOICES:
    with jax.ensure_compile_time_eval():  # run the candidates now, not as part of the model's trace
      measured = _time_candidates(key) >= PAD_GAIN
    _PAD_CHOICES[name] = _agreed_choice(name, measured)
  return _PAD_CHOICES[name]


def remember_choices(directory: str | None) -> None:
  """Keeps the channel-padding choices in `directory` (CHOICES_FILE; None: in memory only): read
  now, rewritten with each new choice. A run and its resumption (the trainer passes the compilation
  cache's directory) then trace the same program, so a resumed run stays bit-identical even for a
  shape whose two timings are close."""
  global _choices_path
  _choices_path = os.path.join(directory, CHOICES_FILE) if directory else None
  if _choices_path:
    _PAD_CHOICES.update(_read_choices(_choices_path))


def _read_choices(path: str) -> dict[str, bool]:
  try:
    with open(path) as f:
      return {str(k): bool(v) for k, v in json.load(f).items()}
  except (OSError, ValueError, AttributeError):  # missing or unreadable: measure again, rewrite it
    return {}


def _agreed_choice(name: str, measured: bool) -> bool:
  """The choice for `name` every process sharing the choices file uses: the first one written.

  Two processes may measure the same shape at once and time it differently (a busy machine); if
  each kept its own, a run and its resumption could trace different programs (outputs ~1 ulp apart).
  So under an exclusive lock the file is read again: a choice already there wins over `measured`,
  otherwise `measured` is added (atomically, the other entries kept)."""
  if not _choices_path:
    return measured
  try:
    os.makedirs(os.path.dirname(_choices_path), exist_ok=True)
    with open(_choices_path + ".lock", "a") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
      on_file = _read_choices(_choices_path)
      if name in on_file:
        _PAD_CHOICES.update(on_file)
        return on_file[name]
      on_file.update({**_PAD_CHOICES, name: measured})
      fd, tmp = tempfile.mkstemp(dir=os.path.dirname(_choices_path), suffix=".tmp")
      with os.fdopen(fd, "w") as f:
        json.dump(on_file, f, indent=0, sort_keys=True)
      os.replace(tmp, _choices_path)  # atomic: readers without the lock never see half a file
  except OSError:  # a read-only cache directory costs a re-measurement next time, nothing else
    pass
  return measured


def _time_candidates(key) -> float:
  """Median time of the plain convolution over that of the channel-padded one (fwd + vjp)."""
  lhs_shape, rhs_shape, strides, pads, lhs_dtype, rhs_dtype = key
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(lhs_shape), lhs_dtype)
  w = jnp.asarray(rng.standard_normal(rhs_shape), rhs_dtype)

  def conv(x, w):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)

  def fwd_bwd(f):
    def step(x, w):
      y, vjp = jax.vjp(f, x, w)
      return vjp(y)
    return jax.jit(step)

  candidates = [fwd_bwd(conv), fwd_bwd(lambda x, w: conv(*pad_channels(x, w, CHANNEL_MULTIPLE)))]
  times = [[], []]
  for f in candidates:
    jax.block_until_ready(f(x, w))
  for _ in range(_PAD_ROUNDS):  # interleaved, so load drifts hit both alike
    for f, t in zip(candidates, times):
      start = time.perf_counter()
      jax.block_until_ready(f(x, w))
      t.append(time.perf_counter() - start)
  return float(np.median(times[0]) / np.median(times[1]))


def max_pool_as_slices(x: jnp.ndarray, window: Sequence[int], strides: Sequence[int],
                       padding: str | Pads = "VALID") -> jnp.ndarray:
  """2-D max pooling (NHWC) as the elementwise maximum of the window's strided slices. Its gradient
  goes, per window, to the first input (row-major) equal to the maximum, as XLA's and PyTorch's."""
  pads = tuple(map(tuple, _pads(padding, x.shape[1:3], window, strides)))
  return _pool(x, tuple(window), tuple(strides), pads)


def _pool_taps(x, window, strides, pads):
  out_hw = [_out_size(n, k, s, p) for n, k, s, p in zip(x.shape[1:3], window, strides, pads)]
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  return xp, out_hw, list(_taps(xp, window, strides, out_hw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _pool(x, window, strides, pads):
  _, _, taps = _pool_taps(x, window, strides, pads)
  out = taps[0][2]
  for _, _, t in taps[1:]:
    out = jnp.maximum(out, t)
  return out


def _pool_fwd(x, window, strides, pads):
  out = _pool(x, window, strides, pads)
  return out, (x, out)


def _pool_bwd(window, strides, pads, residuals, g):
  """Each window's cotangent to its first maximal tap: elementwise selects, then each tap's share
  put back at its strided positions (the transpose of the slice: an interior-padded pad)."""
  x, out = residuals
  xp, (ho, wo), taps = _pool_taps(x, window, strides, pads)
  taken = jnp.zeros(out.shape, bool)
  grad = jnp.zeros(xp.shape, g.dtype)
  zero = jnp.zeros((), g.dtype)
  (sh, sw), (_, hp, wp, _) = strides, xp.shape
  for i, j, t in taps:
    hit = (t == out) & ~taken
    taken = taken | hit
    share = jnp.where(hit, g, zero)
    grad = grad + lax.pad(share, zero, ((0, 0, 0), (i, hp - i - (ho - 1) * sh - 1, sh - 1),
                                        (j, wp - j - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))
  (ph, _), (pw, _) = pads
  return (grad[:, ph:ph + x.shape[1], pw:pw + x.shape[2]],)


_pool.defvjp(_pool_fwd, _pool_bwd)


@dataclasses.dataclass(frozen=True)
class FastPaths:
  """Which formulations a model's convolutions and max-pools take: the `fast_paths` field of every
  model that has them (frozen and hashable, as a linen field must be). Set from the model's config
  option `cpu_fast_paths`; `jtl.models.in_loop_body` sets `every_conv` on a model's copy.

  Attributes:
    enabled: take the fast paths at all (only ever when the model is traced for the CPU backend).
    every_conv: every plain 2-D convolution as a matmul, whatever its map size: for a model traced
      inside a loop body (`lax.scan`, e.g. gradient accumulation), where XLA:CPU runs convolutions
      about 30x slower than outside a loop (resnet_small, 16x16, micro-batch 64: 5.4 s per 4-step
      accumulation with XLA's convolutions, 0.2 s as matmuls). The im2col copies cost memory (2.3x
      the accumulation step's temporary memory there), still that of one micro-batch. Outside a loop
      it would slow large maps down (resnet_small's eval forward at 32x32: 2.5x), so only the loop
      body's copy of a model has it.
  """
  enabled: bool = True
  every_conv: bool = False

  def active(self) -> bool:
    """Whether the model takes the fast paths now (enabled, and the default backend is CPU)."""
    return self.enabled and jax.default_backend() == "cpu"

  def conv_general_dilated(self, lhs: jnp.ndarray, rhs: jnp.ndarray,
                           window_strides: Sequence[int], padding: str | Pads, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                           batch_group_count: int = 1, precision: Any = None,
                           preferred_element_type: Any = None) -> jnp.ndarray:
    """`lax.conv_general_dilated`; on CPU a plain 2-D conv with a small output map (any map with
    `every_conv`) is a matmul, and one with few input channels may be channel-padded."""
    if self.active() and _is_plain_2d(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                                      feature_group_count, batch_group_count):
      pads = _pads(padding, lhs.shape[1:3], rhs.shape[:2], window_strides)
      out_hw = [_out_size(n, k, s, p)
                for n, k, s, p in zip(lhs.shape[1:3], rhs.shape[:2], window_strides, pads)]
      small = out_hw[0] * out_hw[1] <= SMALL_MAP or self.every_conv
      if small and min(min(p) for p in pads) >= 0:
        return conv_as_matmul(lhs, rhs, window_strides, pads, precision, preferred_element_type)
      if lhs.shape[-1] % CHANNEL_MULTIPLE and _padding_channels_pays(lhs, rhs, window_strides, pads):
        lhs, rhs = pad_channels(lhs, rhs)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)

  def max_pool(self, x: jnp.ndarray, window: Sequence[int], strides: Sequence[int],
               padding: str | Pads = "VALID") -> jnp.ndarray:
    """`nn.max_pool` for NHWC maps; on CPU as `max_pool_as_slices` (a fast backward pass)."""
    if self.active() and x.ndim == 4:
      return max_pool_as_slices(x, window, strides, padding)
    return nn.max_pool(x, tuple(window), strides=tuple(strides), padding=padding)


def from_option(cpu_fast_paths: Any) -> FastPaths:
  """A model's `fast_paths` from its config option `cpu_fast_paths` (True or False)."""
  if not isinstance(cpu_fast_paths, bool):
    raise ConfigError(f"cpu_fast_paths must be True or False, got {cpu_fast_paths!r}; set "
                      "--config.model.cpu_fast_paths")
  return FastPaths(enabled=cpu_fast_paths)


def in_loop_body(value: Any) -> Any:
  """`value` (a linen module, or a list/tuple/dict of them) as it should be traced inside a loop body:
  a copy whose every enabled `FastPaths` field, in the module and in the modules it holds as fields,
  has `every_conv` set. Anything else is returned as it is. Called by whoever writes the loop
  (`Objective.in_loop_body`, for gradient accumulation), so a model takes the loop's formulations
  only where it is traced in one."""
  if isinstance(value, FastPaths):
    return dataclasses.replace(value, every_conv=True) if value.enabled else value
  if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):  # (not a namedtuple)
    items = [in_loop_body(v) for v in value]
    return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
  if isinstance(value, dict):
    items = {k: in_loop_body(v) for k, v in value.items()}
    return value if all(items[k] is v for k, v in value.items()) else items
  if not isinstance(value, nn.Module):
    return value
  changes = {}
  for field in dataclasses.fields(value):
    if field.name in ("parent", "name"):
      continue
    old = getattr(value, field.name)
    new = in_loop_body(old) if isinstance(old, (FastPaths, nn.Module, list, tuple, dict)) else old
    if new is not old:
      changes[field.name] = new
  return value.clone(**changes) if changes else value
