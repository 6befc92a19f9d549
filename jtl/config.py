"""The run config at the boundary: local paths made absolute, values range-checked, runs compared.

`prepare(config)` is called once where a run starts (`jtl.train.train`, `jtl.evaluate`): it returns a
copy whose local paths are absolute (orbax refuses relative ones, and a run's `config.json` should say
where things really were), with every top-level value checked. Sections owned by a component are
checked by that component: `data` by `jtl.data`, `optim` by `jtl.optim`, `model` by the model registry
(whose options are exactly the factory's keyword arguments), objective sections by the objective.

Paths: every string leaf whose key is `workdir`, `path`, `data_dir` or ends in `_workdir`, `_path`,
`_dir`, and a `folder:` dataset name, is resolved (`~` expanded, made absolute against the current
directory). Remote paths (`gs://...`, any `scheme://`) are left alone; a `gs://` bucket must exist
and answer (`jtl.remote`).
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from jtl import remote
from jtl.errors import ConfigError

_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_PATH_KEY = re.compile(r"(.*_)?(workdir|path|dir)")
FOLDER_PREFIX = "folder:"

# Keys a resumed run may change without becoming another experiment: how long it runs, how it logs,
# checkpoints and evaluates, where its data lives and on which devices (elastic resume).
RESUMABLE_CHANGES = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval.*",
                     "evals.*", "mesh.*", "data.data_dir", "init_from.*", "checkpoint_verify",
                     "checkpoint_initial", "skip_nonfinite_updates", "checkpoint_checksums",
                     "restart_from_scratch")


def resolve_path(path: str) -> str:
  """`path` made absolute (with `~` expanded) if local; remote (`scheme://`) paths are unchanged, but
  a `gs://` path's bucket must exist and answer (`jtl.remote`: once per bucket, else ConfigError)."""
  if not path:
    return path
  if _REMOTE.match(path):
    remote.check_reachable(path)
    return path
  return str(epath.Path(path).expanduser().resolve())


def _resolve_paths(config: ml_collections.ConfigDict) -> None:
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _resolve_paths(value)
    elif isinstance(value, str) and value and _PATH_KEY.fullmatch(key):
      config[key] = resolve_path(value)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(value: Any, key: str, *, allow_none: bool = False, minimum: int = 1) -> None:
  """ConfigError unless `value` is an int >= `minimum` (or None when allowed)."""
  if value is None and allow_none:
    return
  if not _is_int(value) or value < minimum:
    bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    extra = " or None" if allow_none else ""
    raise ConfigError(f"{key} must be {bound}{extra}, got {value!r}; set --config.{key}")


def section_options(config: ml_collections.ConfigDict, section: str,
                    defaults: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.<section>` over its `defaults`, as a dict; an unknown key is a ConfigError with a
  did-you-mean and the valid keys (an objective's own options section, e.g. `config.maml`)."""
  options = dict(defaults.items())
  for key, value in (config.get(section) or {}).items():
    if key not in options:
      close = difflib.get_close_matches(key, list(options), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown option --config.{section}.{key}{hint}; valid options: "
                        f"{', '.join(options)}")
    options[key] = value
  return options


def check_number(value: Any, key: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
  """ConfigError unless `value` is a finite number in the given (closed unless `*_open`) range
  (inf and nan are never valid: `optim.lr=inf` would only fail at the first step, after writing)."""
  if value is None and allow_none:
    return
  ok = _is_number(value) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
    hi = "" if high is None else f"{high}" + (")" if high_open else "]")
    where = f"in {lo or '(-inf'}, {hi or 'inf)'}"
    raise ConfigError(f"{key} must be a number {where}, got {value!r}; set --config.{key}")


def check_values(config: ml_collections.ConfigDict) -> None:
  """Range checks of the top-level keys every run has."""
  for key in ("total_steps", "batch_size", "log_every", "checkpoint_every"):
    check_positive_int(config.get(key), key)
  check_positive_int(config.get("keep_checkpoints"), "keep_checkpoints", allow_none=True)
  check_positive_int(config.get("skip_nonfinite_updates", 0), "skip_nonfinite_updates", minimum=0)
  if not _is_int(config.get("seed")):
    raise ConfigError(f"seed must be an integer, got {config.get('seed')!r}; set --config.seed")
  check_number(config.get("label_smoothing", 0.0), "label_smoothing", low=0.0, high=1.0,
               high_open=True)
  check_positive_int(config.get("grad_accum_steps", 1), "grad_accum_steps")
  if config.get("precision", "float32") not in PRECISIONS:
    raise ConfigError(f"unknown precision {config.get('precision')!r}; use one of "
                      f"{', '.join(PRECISIONS)} (--config.precision)")
  eval_cfg = config.get("eval") or {}
  check_positive_int(eval_cfg.get("batch_size"), "eval.batch_size", allow_none=True)


PRECISIONS = ("float32", "bfloat16")


def fit_to_total_steps(config: ml_collections.ConfigDict) -> None:
  """Fits the step-counted parts of a config to a run shorter than they are (in place).

  A smoke run (`--config.total_steps=10`) of a config written for hundreds of steps:
  * `optim.warmup_steps >= total_steps`: the warmup becomes `total_steps // 2` (half the run warms up,
    the rest follows the schedule);
  * `phases` starting at or after `total_steps`: those starts are spread evenly over the steps after
    the last phase that fits, so every phase still runs (LP-FT at 10 steps: phases at 0 and 5). If
    there are more phases than steps left to start them, ConfigError says so.
  Each change is logged once, as one line naming the flag that sets the value for real. `prepare`
  calls this, so config.json records the values the run used, and a resumed run computes the same.
  """
  total = config.get("total_steps")
  if not _is_int(total) or total < 1:
    return  # (check_values has refused it)
  optim = config.get("optim")
  warmup = optim.get("warmup_steps", 0) if optim is not None else 0
  if _is_int(warmup) and warmup > 0 and warmup >= total:
    optim.warmup_steps = total // 2
    logging.warning("optim.warmup_steps=%d is not shorter than total_steps=%d: the warmup is "
                    "clipped to %d steps for this run (set --config.optim.warmup_steps to choose)",
                    warmup, total, optim.warmup_steps)
  phases = config.get("phases") or ()
  starts = [p[0] if isinstance(p, (tuple, list)) and p else None for p in phases]
  if not starts or not all(_is_int(s) for s in starts) or max(starts) < total:
    return  # (jtl.phases checks the entries themselves)
  fitting = [s for s in starts if s < total]
  late = len(starts) - len(fitting)
  last = fitting[-1] if fitting else 0
  if not fitting:  # (the first phase must start at 0: jtl.phases says so)
    return
  room = total - 1 - last  # the steps after the last fitting start where a phase may begin
  if late > room:
    raise ConfigError(f"{late} of the {len(starts)} phases start at or after total_steps={total} "
                      f"(phase starts {tuple(starts)}) and only {room} later steps are left to "
                      f"start them; raise --config.total_steps to at least {last + late + 1}")
  new_starts = fitting + [last + (total - last) * (j + 1) // (late + 1) for j in range(late)]
  config.phases = tuple((new_starts[i],) + tuple(p[1:]) for i, p in enumerate(phases))
  logging.warning("phases start at steps %s but total_steps=%d: they start at %s for this run, so "
                  "every phase runs (raise --config.total_steps for the configured schedule)",
                  tuple(starts), total, tuple(new_starts))


def _apply_precision(config: ml_collections.ConfigDict) -> None:
  """`precision=bfloat16` is the model's compute dtype (its params stay float32)."""
  if config.get("precision", "float32") == "float32" or "model" not in config:
    return
  dtype = config.model.get("dtype")
  if dtype not in (None, "float32", "bfloat16"):
    raise ConfigError(f"precision=bfloat16 but model.dtype={dtype!r}; set one of them "
                      "(--config.precision or --config.model.dtype)")
  with config.model.unlocked():
    config.model.dtype = "bfloat16"


MAX_STEPS_ENV = "JTL_MAX_STEPS"
SMOKE_EPISODES = 20  # episodic evaluations of a JTL_MAX_STEPS run draw at most this many episodes


def clip_to_max_steps(config: ml_collections.ConfigDict) -> None:
  """`total_steps` at most $JTL_MAX_STEPS, when that is set (in place), and episodic evaluators at
  most SMOKE_EPISODES episodes (600 by default: minutes of evaluation after a two-step run).

  For smoke runs of commands as they are written (tests/test_docs.py runs every documented command
  this way): the command needs no edit, and `fit_to_total_steps` then fits warmups and phases into
  the shorter run. One log line says so; config.json records the values the run used.
  """
  limit = os.environ.get(MAX_STEPS_ENV, "").strip()
  if not limit:
    return
  if not limit.isdigit() or int(limit) < 1:
    raise ConfigError(f"{MAX_STEPS_ENV}={limit!r} is not a positive whole number of steps; unset it "
                      f"or set it to e.g. 5")
  total = config.get("total_steps")
  if _is_int(total) and total > int(limit):
    config.total_steps = int(limit)
    logging.warning("total_steps=%d clipped to %d by $%s", total, int(limit), MAX_STEPS_ENV)
  for name, entry in (config.get("evals") or {}).items():
    if isinstance(entry, ml_collections.ConfigDict) and entry.get("type") == "episodic":
      episodes = entry.get("num_episodes", 600)
      if _is_int(episodes) and episodes > SMOKE_EPISODES:
        with entry.unlocked():
          entry.num_episodes = SMOKE_EPISODES
        logging.warning("evals.%s.num_episodes=%d clipped to %d by $%s", name, episodes,
                        SMOKE_EPISODES, MAX_STEPS_ENV)


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A checked copy of `config` with local paths absolute; ConfigError on a bad value."""
  config = copy.deepcopy(config)
  _resolve_paths(config)
  check_values(config)
  clip_to_max_steps(config)
  fit_to_total_steps(config)
  _apply_precision(config)
  name = config.data.get("name") if "data" in config else None
  if isinstance(name, str) and name.startswith(FOLDER_PREFIX):
    config.data.name = FOLDER_PREFIX + resolve_path(name[len(FOLDER_PREFIX):])
  return config


def as_plain(config: ml_collections.ConfigDict | dict) -> dict:
  """The config as plain JSON values (tuples become lists), as `config.json` holds it."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differences(run: dict, given: dict, ignore: tuple[str, ...] = (),
                shared_only: bool = False) -> list[str]:
  """`key (X in the run, Y given)` for every flattened key whose values differ, minus `ignore` globs
  (with `shared_only`, keys only one side has, e.g. options a newer jtl added, are not differences)."""
  run_flat, given_flat = flatten(as_plain(run)), flatten(as_plain(given))
  ignored = [re.compile(re.escape(p).replace(r"\.\*", r"\..*").replace(r"\*", ".*")) for p in ignore]
  out = []
  for key in sorted(set(run_flat) | set(given_flat)):
    if any(r.fullmatch(key) for r in ignored):
      continue
    if shared_only and (key not in run_flat or key not in given_flat):
      continue
    a, b = run_flat.get(key, "<absent>"), given_flat.get(key, "<absent>")
    if a != b:
      out.append(f"{key} ({a!r} in the run, {b!r} given)")
  return out


def from_plain(tree: dict) -> ml_collections.ConfigDict:
  """A ConfigDict from plain (JSON) values, lists turned back into tuples."""
  return ml_collections.ConfigDict(_tuples(tree))


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples config files write (rule tables, label sets, mesh axes)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def run_config_path(workdir: str | epath.Path) -> epath.Path:
  return epath.Path(workdir) / "config.json"


def load_run_config(workdir: str | epath.Path) -> ml_collections.ConfigDict | None:
  """The resolved config a run wrote into its workdir, or None if it has none."""
  path = run_config_path(workdir)
  if not path.exists():
    return None
  try:
    return from_plain(json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"cannot read {path} ({e}); restore it, or pass --config") from e


def unknown_override_error(path: str, reference: ml_collections.ConfigDict) -> ConfigError:
  """The error for a `--config.PATH` override that names no key of the config file."""
  parts = path.split(".")
  node, depth = reference, 0
  while depth < len(parts) - 1 and isinstance(node.get(parts[depth]), ml_collections.ConfigDict):
    node, depth = node[parts[depth]], depth + 1
  parent = ".".join(parts[:depth])
  names = list(node.keys())
  close = difflib.get_close_matches(parts[depth], names, n=1, cutoff=0.6)
  if not close:  # a key put in the wrong section?
    everywhere = list(flatten(as_plain(reference)))
    close = difflib.get_close_matches(path, everywhere, n=1, cutoff=0.6)
    if not close:
      by_name = {k.rsplit(".", 1)[-1]: k for k in everywhere}
      close = [by_name[c] for c in difflib.get_close_matches(parts[-1], list(by_name), n=1)]
  else:
    close = [".".join(parts[:depth] + close)]
  hint = f" (did you mean --config.{close[0]}?)" if close else ""
  where = f"config.{parent}" if parent else "the config"
  keys = (f"keys of {where}: {', '.join(names)}" if names else
          f"{where} has no keys: set it whole, e.g. --config.{parent}=\"{{'{parts[depth]}': VALUE}}\"")
  return ConfigError(f"unknown config key {path!r}{hint}; {keys}")
