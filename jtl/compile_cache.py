"""The persistent JAX compilation cache: a restarted or resumed run skips recompiling its steps.

The directory is `config.compilation_cache` if set, else `$JTL_COMPILATION_CACHE`, else
`$XDG_CACHE_HOME/jtl/xla` (`~/.cache/jtl/xla`); `"none"` (or an empty string) turns it off. Entries
are keyed by the computation and the compiler's flags, so a cache is safe to share between runs.
"""
from __future__ import annotations

import os

import jax
from absl import logging

from jtl.config import resolve_path

_enabled: str | None = None


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jtl", "xla")


def enable(setting: str | None = None) -> str | None:
  """Points JAX's persistent cache at the configured directory (once per process); returns it."""
  global _enabled
  path = setting if setting is not None else os.environ.get("JTL_COMPILATION_CACHE", default_dir())
  if not path or path.lower() == "none":
    return None
  path = resolve_path(path)
  if _enabled != path:
    if _enabled is not None:  # JAX opens its cache once: moving it needs a reset
      from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
      compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", path)
    # Small programs too: the steps of small models compile in well under JAX's 1 s default.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logging.info("compilation cache: %s", path)
    _enabled = path
  return path
