"""Weight files as flat `{name: np.ndarray}` dicts: PyTorch (.pt/.pth/.bin), .safetensors, .npz.

Names are the file's own (`layer1.0.conv1.weight`, `Transformer/encoder_norm/scale`,
`params/backbone/stem_conv/kernel`); `jtl.pretrained.naming` maps them to jtl paths. Nothing here
needs torch: .pt files go through `torch_pickle`'s restricted unpickler, .safetensors through
`safetensors.numpy`. bfloat16 arrays are `ml_dtypes.bfloat16`; an .npz written by big_vision stores
them as 2-byte void (`V2`), which is viewed back as bfloat16 as big_vision does.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy before safetensors reads a BF16 file)
import numpy as np
from etils import epath

from jtl.errors import ConfigError
from jtl.pretrained import torch_pickle

FORMATS = ("auto", "torch", "safetensors", "npz")
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
SUFFIXES = {".pt": "torch", ".pth": "torch", ".bin": "torch", ".safetensors": "safetensors",
            ".npz": "npz"}


def resolve_format(path: str, format: str = "auto") -> str:
  """The reader to use: `format` itself, or for "auto" the one the file suffix names."""
  if format not in FORMATS:
    raise ConfigError(f"unknown pretrained format {format!r}; choose one of: {', '.join(FORMATS)}")
  if format != "auto":
    return format
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIXES:
    raise ConfigError(f"cannot tell the format of {path} from its suffix {suffix!r}; rename it to "
                      f"one of {', '.join(SUFFIXES)} or pass format= one of: "
                      f"{', '.join(FORMATS[1:])}")
  return SUFFIXES[suffix]


def read_tensors(path: str | os.PathLike, format: str = "auto") -> dict[str, np.ndarray]:
  """Reads every tensor of a weight file into host memory, keyed by the file's names."""
  path = os.fspath(path)
  kind = resolve_format(path, format)
  if _REMOTE.match(path):
    return _read_remote(path, kind)
  if not os.path.isfile(path):
    raise ConfigError(f"pretrained weights file {path} does not exist; fix the path")
  if kind == "torch":
    return torch_pickle.read_state_dict(path)
  if kind == "safetensors":
    import safetensors.numpy  # imported here: only this format needs it
    try:
      return dict(safetensors.numpy.load_file(path))
    except Exception as e:  # safetensors raises its own error types for a corrupt header
      raise ConfigError(f"cannot read {path} as .safetensors ({type(e).__name__}: {e}); check the "
                        "file or pass the right format=") from None
  try:
    with np.load(path, allow_pickle=False) as npz:  # no pickled objects: arrays only
      tensors = {name: npz[name] for name in npz.files}
  except (ValueError, OSError, EOFError) as e:
    raise ConfigError(f"cannot read {path} as .npz ({type(e).__name__}: {e}); check the file or "
                      "pass the right format=") from None
  return {name: _recover_bfloat16(a) for name, a in tensors.items()}


def _read_remote(path: str, kind: str) -> dict[str, np.ndarray]:
  """A `gs://` (any `scheme://` epath reads) weights file: its bytes fetched to a local temporary
  file, since the torch and safetensors readers take local paths (and safetensors maps the file)."""
  remote = epath.Path(path)
  if not remote.is_file():
    raise ConfigError(f"pretrained weights file {path} does not exist; fix the path")
  with tempfile.TemporaryDirectory(prefix="jtl_weights_") as tmp:
    local = os.path.join(tmp, "weights" + os.path.splitext(path)[1])
    with remote.open("rb") as source, open(local, "wb") as target:
      shutil.copyfileobj(source, target, 16 << 20)
    return read_tensors(local, kind)


def _recover_bfloat16(array: np.ndarray) -> np.ndarray:
  if array.dtype.kind == "V" and array.dtype.itemsize == 2:
    return array.view(ml_dtypes.bfloat16)
  return array


def write_npz(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes `{name: array}` with `np.savez` (uncompressed, as big_vision and vit_jax do)."""
  path = os.fspath(path)
  if not path.endswith(".npz"):
    raise ConfigError(f"npz path {path} must end in .npz (NumPy would append it); fix the path")
  np.savez(path, **{name: np.asarray(a) for name, a in tensors.items()})
