"""LoRA: low-rank adapters on the Dense, Conv and attention (DenseGeneral) kernels of any linen model.

Hu et al. 2021 (arXiv:2106.09685), eq. (3): a frozen weight W_0 [d_in, d_out] gets a trainable update
of rank r, so that h = W_0 x + (alpha / r) B A x, with A [r, d_in] random Gaussian and B [d_out, r]
zero at the start ("so dW = BA is zero at the beginning of training"). In jtl's x @ W layout the
factors are stored transposed: `lora_a` [d_in, r], `lora_b` [r, d_out], update = s * A @ B with
s = alpha / r, or alpha / sqrt(r) with `rslora` (rank-stabilised LoRA, Kalajdzievski 2023, eq. 2:
keeps the update's scale independent of r). `lora_a` ~ N(0, 1 / d_in), so `x @ A` has the scale of x.

Which kernels: `config.lora.rules`, a rule table (jtl.masks) matched against the `params/.../kernel`
path of every Dense, Conv and DenseGeneral module call; the first match wins, unmatched kernels get no
adapter. The adapters live next to their kernel: `params/backbone/stage1/conv/{kernel,lora_a,lora_b}`,
created at init by a flax method interceptor (`nn.intercept_methods`), so no model code changes.
`jtl.masks` preset `trainable="lora"` trains the adapters and the head and freezes the rest.

How the update is applied (the same function as `W_0 + s A B`, without forming it, so the frozen
kernel's weight gradient is never needed):
  Dense          y = x W_0 + b + s (x A) B
  DenseGeneral   W_0 [in_1..in_k, out_1..out_m] is seen as a [prod(in), prod(out)] matrix (row-major,
                 the order of `axis` then `features`); x is contracted with A reshaped to
                 [in_1..in_k, r] by the module's own `axis`, then with B reshaped to [r, out_1..out_m].
  Conv           the kernel [kh, kw, c_in, c_out] seen as the matrix [kh*kw*c_in, c_out] (HWIO
                 flattened row-major: the im2col row order). Then conv(x, W_0 + s reshape(A B)) =
                 conv(x, W_0) + s conv_1x1(conv(x, reshape(A, [kh, kw, c_in, r])), B) by linearity:
                 a conv with r output channels and the module's strides, padding and dilation,
                 then a 1x1 projection. Grouped (feature_group_count > 1) and masked convolutions
                 are not supported (a ConfigError names the path).
`merge(params, lora_cfg)` folds every adapter into its kernel (W_0 + s reshape(A B, W_0.shape)) and
drops `lora_a`/`lora_b`: the plain model then computes the adapted function.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jtl import masks
from jtl.errors import ConfigError

PyTree = Any
ADAPTERS = ("lora_a", "lora_b")
_ADAPTED_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv)
# Set while an adapter branch runs: its own Dense/Conv modules must not be intercepted again.
_IN_BRANCH: contextvars.ContextVar[bool] = contextvars.ContextVar("jtl_lora_branch", default=False)


def default_config() -> ml_collections.ConfigDict:
  """`config.lora`: rank 0 = off. The default rules adapt every backbone kernel."""
  return ml_collections.ConfigDict(dict(
      rules=(("params/backbone/.*", True), (".*", False)), rank=0, alpha=8.0, rslora=False))


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Range checks of `config.lora`; ConfigError names the flag."""
  rank = cfg.get("rank", 0)
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    raise ConfigError(f"lora.rank must be an integer >= 0 (0: no adapters), got {rank!r}; set "
                      "--config.lora.rank")
  alpha = cfg.get("alpha", 8.0)
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
    raise ConfigError(f"lora.alpha must be a number > 0, got {alpha!r}; set --config.lora.alpha")
  if not isinstance(cfg.get("rslora", False), bool):
    raise ConfigError(f"lora.rslora must be True or False, got {cfg.get('rslora')!r}; set "
                      "--config.lora.rslora")
  masks.compile_rules(cfg.get("rules", ()), what="config.lora.rules")


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the run adds adapters (`config.lora.rank > 0`); checks the section first."""
  cfg = config.get("lora")
  if not cfg:
    return False
  check_config(cfg)
  return cfg.get("rank", 0) > 0


def scale(cfg: ml_collections.ConfigDict) -> float:
  """s = alpha / r, or alpha / sqrt(r) with rslora."""
  rank = cfg.rank
  return float(cfg.alpha) / (float(np.sqrt(rank)) if cfg.get("rslora", False) else float(rank))


def _input_axes(module: nn.Module, kernel_ndim: int) -> int:
  """How many leading kernel axes are contracted with the input (d_in = their product)."""
  if isinstance(module, nn.DenseGeneral):
    return len(module.axis) if isinstance(module.axis, (tuple, list)) else 1
  return kernel_ndim - 1  # Dense: [in, out]; Conv: [kh, kw, c_in, c_out]


def _check_supported(module: nn.Module, path: str) -> None:
  if isinstance(module, nn.Conv) and (module.feature_group_count != 1 or
                                      getattr(module, "mask", None) is not None):
    raise ConfigError(f"LoRA does not support the grouped or masked convolution {path}; exclude it "
                      "with a (pattern, False) rule in --config.lora.rules")
  if isinstance(module, nn.DenseGeneral) and module.batch_dims:
    raise ConfigError(f"LoRA does not support DenseGeneral with batch_dims ({path}); exclude it "
                      "with a (pattern, False) rule in --config.lora.rules")


def _branch(module: nn.Module, x: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray, kernel_shape: tuple,
            n_in: int, s: float) -> jnp.ndarray:
  """s * (x A) B computed with the module's own contraction (conv geometry, DenseGeneral axes)."""
  rank = a.shape[-1]
  down = module.clone(parent=None, name=None, features=rank, use_bias=False)
  h = down.apply({"params": {"kernel": a.reshape(kernel_shape[:n_in] + (rank,))}}, x) * s
  out_shape = kernel_shape[n_in:]
  up = nn.DenseGeneral(out_shape, axis=-1, use_bias=False, dtype=module.dtype,
                       param_dtype=module.param_dtype, precision=module.precision)
  return up.apply({"params": {"kernel": b.reshape((rank,) + out_shape)}}, h)


def _interceptor(cfg: ml_collections.ConfigDict):
  rules = masks.compile_rules(cfg.rules, what="config.lora.rules")
  rank, s = int(cfg.rank), scale(cfg)
  selected: dict[str, bool] = {}  # path -> first-match value (module calls repeat every trace)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (_IN_BRANCH.get() or context.method_name != "__call__"
        or not isinstance(module, _ADAPTED_TYPES)):
      return next_fun(*args, **kwargs)
    path = "/".join(("params",) + tuple(module.scope.path) + ("kernel",))
    if path not in selected:
      selected[path] = next((bool(v) for r, v in rules if r.fullmatch(path)), False)
    y = next_fun(*args, **kwargs)
    if not selected[path]:
      return y
    _check_supported(module, path)
    kernel_shape = tuple(nn.meta.unbox(module.get_variable("params", "kernel")).shape)
    n_in = _input_axes(module, len(kernel_shape))
    d_in, d_out = int(np.prod(kernel_shape[:n_in])), int(np.prod(kernel_shape[n_in:]))
    a = module.param("lora_a", nn.initializers.normal(stddev=d_in ** -0.5), (d_in, rank),
                     module.param_dtype)
    b = module.param("lora_b", nn.initializers.zeros, (rank, d_out), module.param_dtype)
    x = args[0] if args else kwargs["inputs"]
    token = _IN_BRANCH.set(True)
    try:
      delta = _branch(module, x, a, b, kernel_shape, n_in, s)
    finally:
      _IN_BRANCH.reset(token)
    return y + delta.astype(y.dtype)

  return intercept


@contextlib.contextmanager
def adapters(cfg: ml_collections.ConfigDict) -> Iterator[None]:
  """Within this context, every linen init/apply adds the adapters `cfg.rules` selects (read when the
  model is traced: enter it inside a jitted function, or keep it fixed for the function's life)."""
  check_config(cfg)
  with nn.intercept_methods(_interceptor(cfg)):
    yield


def adapter_paths(params: PyTree, prefix: str = "params") -> list[str]:
  """Paths of the `lora_a`/`lora_b` leaves of a params tree."""
  return [p for p in masks.leaf_paths(params, prefix) if p.rsplit("/", 1)[-1] in ADAPTERS]


def _check_rules(params: PyTree, cfg: ml_collections.ConfigDict) -> None:
  """Every rule matches some kernel, and every selected kernel got an adapter."""
  flat = traverse_util.flatten_dict(params)
  kernels = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] == "kernel"})
  chosen = masks.match(kernels, cfg.rules, default=False, what="config.lora.rules")
  for path, value in zip(masks.leaf_paths(kernels), jax.tree.leaves(chosen)):
    key = tuple(path.split("/")[1:-1]) + ("lora_a",)
    if not isinstance(value, (bool, np.bool_)):
      raise ConfigError(f"config.lora.rules must map patterns to True/False, got {value!r}; fix "
                        "--config.lora.rules")
    if value and key not in flat:
      raise ConfigError(f"config.lora.rules selects {path}, which is not the kernel of a Dense, Conv "
                        "or DenseGeneral module; exclude it with a (pattern, False) rule")


class LoRAModel:
  """A linen model whose `init` and `apply` run with adapters (see `adapters`); everything else is
  the wrapped model's. Drop-in for the model an objective holds (`jtl.objectives.apply_model`)."""

  def __init__(self, model: nn.Module, cfg: ml_collections.ConfigDict):
    check_config(cfg)
    self.model, self.lora = model, cfg

  def init(self, *args: Any, **kwargs: Any) -> PyTree:
    """`model.init` with adapters; ConfigError if a rule selects nothing or an unsupported kernel."""
    with adapters(self.lora):
      variables = self.model.init(*args, **kwargs)
    _check_rules(variables["params"], self.lora)
    return variables

  def apply(self, *args: Any, **kwargs: Any) -> Any:
    """`model.apply` with adapters (params must hold them)."""
    with adapters(self.lora):
      return self.model.apply(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.__dict__["model"], name)


def wrap(model: nn.Module, cfg: ml_collections.ConfigDict) -> LoRAModel:
  """`model` with the adapters of `cfg` (`config.lora`)."""
  return LoRAModel(model, cfg)


def merge(params: PyTree, lora_cfg: ml_collections.ConfigDict) -> PyTree:
  """Plain params: each adapted kernel replaced by W_0 + s reshape(A @ B), adapters dropped.

  Works on NumPy or JAX arrays (jit-compatible); the kernel keeps its dtype (the sum is in float32).
  """
  check_config(lora_cfg)
  s = scale(lora_cfg)
  flat = traverse_util.flatten_dict(params)
  out = {}
  for key, value in flat.items():
    if key[-1] in ADAPTERS:
      continue
    if key[-1] == "kernel" and key[:-1] + ("lora_a",) in flat:
      a, b = flat[key[:-1] + ("lora_a",)], flat[key[:-1] + ("lora_b",)]
      delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                         precision="highest")
      value = (jnp.asarray(value, jnp.float32) + s * delta.reshape(value.shape)).astype(value.dtype)
    out[key] = value
  return traverse_util.unflatten_dict(out)
