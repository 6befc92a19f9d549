"""Reads PyTorch `.pt`/`.pth` files into NumPy without torch and without running pickled code.

The format (torch >= 1.6, `torch.save` defaults) is a zip archive `<name>/data.pkl`,
`<name>/data/<key>`, `<name>/byteorder`, ...: `data.pkl` is a pickle (protocol 2) whose tensors are
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls, and each storage is a
persistent id `('storage', torch.<Type>Storage, key, location, numel)` naming the raw bytes in
`data/<key>`. A tensor is a strided view of its storage (several tensors may share one), so it is
rebuilt with the storage offset and strides honoured and then copied to a contiguous array.

The unpickler resolves only the globals a state dict needs (OrderedDict, the tensor/parameter
rebuild functions, the storage types) to local NumPy stand-ins; any other global (a class, a
function such as `os.system`) is refused before anything is called, so a malicious file cannot run
code. Legacy (pre-1.6, non-zip) files are refused with how to re-save them.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from jtl.errors import ConfigError

# torch storage type -> NumPy dtype (bfloat16 via ml_dtypes, which jax already depends on).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
# Entries of a training checkpoint dict that hold the model's state dict.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
_RESAVE = ("re-save just the weights, e.g. torch.save(model.state_dict(), path), or convert them "
           "to .safetensors")


class _Refused(Exception):
  """Raised inside the unpickler; turned into a ConfigError naming the file."""


class _StorageType:
  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


class _TensorType:
  """Stand-in for `torch.Tensor` / `torch.nn.Parameter` as the type argument of a rebuild call."""


def _check_ints(what: str, values: Any) -> tuple[int, ...]:
  values = tuple(values)
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
    raise _Refused(f"bad tensor {what} {values!r}")
  return values


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Any, stride: Any, *_unused: Any
                    ) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2`: the strided view of `storage`, copied to be contiguous."""
  if not isinstance(storage, np.ndarray):
    raise _Refused("a tensor whose storage is not a saved storage")
  offset = _check_ints("offset", (offset,))[0]
  size, stride = _check_ints("size", size), _check_ints("stride", stride)
  if len(size) != len(stride):
    raise _Refused(f"tensor size {size} and stride {stride} differ in rank")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:  # as_strided does no bounds checks: never read past the storage
    raise _Refused(f"tensor reaches element {last} of a storage of {storage.size}")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride], writeable=False)
  return np.array(view, order="C")  # an owned, C-contiguous copy


def _rebuild_parameter(data: np.ndarray, *_unused: Any) -> np.ndarray:
  """`torch._utils._rebuild_parameter(_with_state)`: an nn.Parameter is just its data here."""
  if not isinstance(data, np.ndarray):
    raise _Refused("a parameter whose data is not a tensor")
  return data


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, state: Any) -> np.ndarray:
  """`torch._tensor._rebuild_from_type_v2`, allowed for plain tensors/parameters without state."""
  if not isinstance(new_type, _TensorType) or state:
    raise _Refused("a tensor subclass or a tensor with Python attributes")
  return func(*args)


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TensorType(),
    ("torch.nn.parameter", "Parameter"): _TensorType(),
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_GLOBALS`; storages are read from the zip archive by key (and cached, as
  several tensors may view the same storage)."""

  def __init__(self, archive: zipfile.ZipFile, root: str, big_endian: bool):
    super().__init__(archive.open(f"{root}data.pkl"))
    self._archive, self._root, self._big_endian = archive, root, big_endian
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _GLOBALS:
      raise _Refused(f"refusing to load {module}.{name} (only tensors and dicts are read; no "
                     "pickled code is run)")
    return _GLOBALS[(module, name)]

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise _Refused(f"unsupported persistent id {str(pid)[:80]}")
    _, storage_type, key, _location, numel = pid
    if key not in self._storages:
      raw = self._archive.read(f"{self._root}data/{key}")
      dtype = storage_type.dtype
      if len(raw) != numel * dtype.itemsize:
        raise _Refused(f"storage {key} has {len(raw)} bytes, expected {numel} x {dtype.itemsize}")
      array = np.frombuffer(raw, dtype=dtype)
      if self._big_endian and dtype.itemsize > 1:
        swapped = np.frombuffer(raw, dtype=np.dtype(f"u{dtype.itemsize}")).byteswap()
        array = swapped.view(dtype)
      self._storages[key] = array
    return self._storages[key]


def load_torch_object(path: str) -> Any:
  """The unpickled object of a torch zip file: tensors as NumPy arrays, dicts as dicts."""
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(2)
    if head == b"\x80\x02":
      raise ConfigError(f"{path} is in torch's legacy (pre-1.6, non-zip) format, which jtl does "
                        "not read; re-save it with torch >= 1.6 defaults: "
                        "torch.save(torch.load(path), new_path)")
    raise ConfigError(f"{path} is not a PyTorch zip file; pass format= the file's real format "
                      "(torch, safetensors or npz)")
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise _Refused("no single <archive>/data.pkl (a TorchScript or other zip file?)")
      root = pickles[0][: -len("data.pkl")]
      names = set(archive.namelist())
      big_endian = (f"{root}byteorder" in names
                    and archive.read(f"{root}byteorder").strip() == b"big")
      return _RestrictedUnpickler(archive, root, big_endian).load()
  except _Refused as e:
    raise ConfigError(f"cannot read {path}: {e}; {_RESAVE}") from None
  except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, ValueError,
          TypeError) as e:
    raise ConfigError(f"cannot read {path} as a PyTorch file ({type(e).__name__}: {e}); "
                      f"{_RESAVE}") from None


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The `{name: array}` state dict in a torch file: the object itself if it is a dict of tensors,
  else its `state_dict` / `model` / `model_state_dict` entry (a training checkpoint)."""
  obj = load_torch_object(path)
  for _ in range(2):  # a checkpoint dict holding a state dict, at most one level down
    if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
      return {str(k): v for k, v in obj.items()}
    entry = next((k for k in STATE_DICT_KEYS if isinstance(obj, dict) and k in obj), None)
    if entry is None:
      break
    obj = obj[entry]
  keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
  raise ConfigError(f"{path} holds no state dict (a dict of tensors, or a dict with one of "
                    f"{', '.join(STATE_DICT_KEYS)}); found {keys}; {_RESAVE}")
