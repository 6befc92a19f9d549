"""`--config.KEY=None` on the command line: every key a config declares as possibly None takes it.

A key is declared as possibly None when the config file stores it as a placeholder or typed field
(`config_dict.placeholder(int)`, `FieldReference(3, field_type=object)`) or with the value None; the
configs' comments document None for exactly those (`init_from.step`: the newest checkpoint,
`keep_checkpoints`: keep all, `compilation_cache`: the default place, ...). ml_collections alone parses
"None" for an int field as an error and for a str field as the string 'None'.
"""
from __future__ import annotations

from pathlib import Path

import ml_collections
import pytest
from absl import flags

from experiments import cli
from jtl import config as config_lib
from jtl.errors import ConfigError

CONFIGS = sorted(p.stem for p in (Path(__file__).parent.parent / "experiments" / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))
ARGS = {"finetune_folder": ":path={folder}"}  # it counts the folder's classes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  for label in ("a", "b"):
    (root / label).mkdir()
  return root


def _parse(config: str, *overrides: str, folder: Path | None = None) -> ml_collections.ConfigDict:
  flag_values = flags.FlagValues()
  args = ARGS.get(config, "").format(folder=folder)
  argv = ["train", f"--config=experiments/configs/{config}.py{args}", *overrides]
  cli.define_config_flag(flag_values, argv, "")
  flag_values(argv)
  return cli.load_config(flag_values)


def _none_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Keys declared as possibly None (see the module docstring), found independently of cli.py by
  the declared field types."""
  out = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += _none_keys(value, f"{prefix}{key}.")
    elif value is None or config.get_type(key) is object:
      out.append(prefix + key)
    elif isinstance(config._fields[key], ml_collections.FieldReference):  # a typed placeholder
      out.append(prefix + key)
  return out


@pytest.mark.parametrize("config", CONFIGS)
def test_every_key_declared_as_possibly_none_takes_none(config, folder):
  written = _parse(config, folder=folder)
  keys = _none_keys(written)
  assert {"init_from.step", "init_from.workdir"} <= set(keys)  # every config has these
  parsed = _parse(config, *(f"--config.{key}=None" for key in keys), "--config.seed=7", folder=folder)
  for key in keys:
    node = parsed
    for part in key.split("."):
      node = node[part]
    assert node is None, key
  assert parsed.seed == 7  # the other overrides still apply


def test_the_issue_cases_and_a_key_that_cannot_be_none():
  config = _parse("transfer_digits", "--config.init_from.step=None", "--config.keep_checkpoints=None",
                  "--config.compilation_cache=None")
  assert (config.init_from.step, config.keep_checkpoints, config.compilation_cache) == (None,) * 3
  assert _parse("pretrain_digits", "--config.init_from.step=3").init_from.step == 3
  # Any key parses None; the key's own check then says whether None is valid there.
  with pytest.raises(ConfigError, match="total_steps must be a positive int"):
    config_lib.check_values(_parse("pretrain_digits", "--config.total_steps=None"))
  with pytest.raises(ConfigError, match="unknown config key 'total_stepz'"):
    _parse("pretrain_digits", "--config.total_stepz=None")
