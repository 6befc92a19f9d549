"""The data config (`config.data`): defaults and cheap value checks that need no dataset."""
import ast
import difflib
from typing import Any

import ml_collections
from ml_collections import config_dict

from jtl.errors import ConfigError


def default_data_config() -> ml_collections.ConfigDict:
  """Returns `config.data` with every key the pipeline reads, set to its default."""
  c = ml_collections.ConfigDict()
  c.name = 'sklearn_digits'  # A TFDS name ('mnist', 'cifar10:3.0.2') or an embedded builder.
  c.data_dir = config_dict.placeholder(str)  # None: the TFDS default, which honours $TFDS_DATA_DIR.
  c.train_split = 'train'  # Any TFDS split string, e.g. 'train[:90%]'.
  c.eval_split = 'test'  # Or 'rest': the train split's examples that `shots` did not pick.
  c.labels = config_dict.placeholder(tuple)  # Keep only these classes, remapped to 0..len-1 in order.
  c.shots = config_dict.placeholder(int)  # K examples per class of the train split.
  c.shots_seed = 0  # Which K examples; selection is over the whole split, before host sharding.
  c.image_size = config_dict.placeholder(int)  # Resize to a square of this side.
  # 'unit' (x/255 in [0, 1]) or a (mean, std) pair in [0, 1] units: (x/255 - mean) / std.
  # `object` so a Python config can assign a tuple; the CLI parses '((0.5,),(0.25,))' too.
  c.normalize = config_dict.FieldReference('unit', field_type=object)
  c.augment = False  # Random crop after zero padding (no flips: they are wrong for digits).
  c.crop_padding = 1  # Pixels of zero padding around the image for the random crop.
  # 'resize' (every split resized to image_size) or 'inception' (the ImageNet recipe: a random-resized
  # crop of area fraction in crop_area, resized to image_size, in training; the shorter side resized
  # to image_size / center_crop and the centre square kept, in evaluation). jtl/data/preprocess.py.
  c.crop = 'resize'
  c.crop_area = (0.08, 1.0)
  c.center_crop = 0.875
  c.flip = False  # Mirror half of the training images left to right (not for digits or text).
  c.shuffle_buffer = 10_000  # Only for cache=False (streaming); the in-memory path shuffles fully.
  # Class-balanced batches (in memory only): every run of per_class consecutive training examples is
  # one class, so a batch of B holds B / per_class classes with per_class examples each (SupCon's
  # positives among many classes). 0: plain shuffling. jtl/data/pipeline.py's docstring.
  c.per_class = 0
  c.cache = True  # Hold the decoded (filtered) split in memory: right for small sets.
  # `folder:<path>` datasets without train/ and test/ sub-folders: each class's held-out test share.
  c.folder_test_fraction = 0.2
  # Several datasets per step, one per task: {task: dict(weight=w, **overrides of these keys)}; the
  # batch is then {task: batch}, task t getting a share w_t / sum(w) of batch_size. Empty: one dataset.
  c.mixture = ml_collections.ConfigDict()
  # Scarce labels (in memory only; jtl/data/labelled.py): {feature: fraction}. The training batches
  # keep `feature`'s value on that fraction of each of its classes' training examples (at least one
  # per class, a fixed draw seeded by shots_seed) and read -1 elsewhere: a missing label, which the
  # multitask objective's losses skip. Evaluation splits keep every label. Empty: every label kept.
  c.label_fraction = ml_collections.ConfigDict()
  # [episodes] N-way K-shot meta-learning batches (jtl/data/episodes.py): ways N, shots K and queries
  # Q per class; batch_size then counts episodes. ways=0: ordinary batches. rotations=4 (or 2): each
  # training class also appears turned by 90, 180, 270 degrees (or 180), as new classes (training
  # episodes only; Snell et al.'s Omniglot recipe).
  c.episodes = ml_collections.ConfigDict(dict(ways=0, shots=1, queries=15, rotations=1))
  return c


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _flag(key: str) -> str:
  return f'--config.data.{key}'


def parse_normalize(value: Any) -> tuple[Any, Any] | None:
  """Returns None for 'unit', else the (mean, std) pair; ConfigError if it is neither."""
  if isinstance(value, str) and value.strip().startswith('('):
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
  if value == 'unit':
    return None
  if isinstance(value, (tuple, list)) and len(value) == 2:
    try:
      mean, std = (tuple(float(v) for v in x) if isinstance(x, (tuple, list)) else float(x)
                   for x in value)
    except (TypeError, ValueError):
      mean = std = None
    stds = std if isinstance(std, tuple) else (std,)
    if mean is not None and all(s > 0 for s in stds):
      return mean, std
  raise ConfigError(
      f"bad data.normalize={value!r}; set {_flag('normalize')} to 'unit' or a (mean, std) pair "
      "in [0, 1] units with std > 0, e.g. '((0.5,),(0.25,))'")


def resolve(data_config: ml_collections.ConfigDict | dict[str, Any]) -> ml_collections.ConfigDict:
  """Fills missing keys from `default_data_config()` and checks every value that needs no dataset.

  Unknown keys (usually typos) are errors, so a misspelt option never silently does nothing.
  """
  defaults = default_data_config()
  given = dict(data_config.items())
  for key in given:
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults.keys()), n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      raise ConfigError(f'unknown data config key {key!r}{hint}; '
                        f'valid keys: {", ".join(defaults.keys())}')
  c = ml_collections.ConfigDict({**defaults.to_dict(), **given})
  c.mixture = ml_collections.ConfigDict(dict(c.get('mixture') or {}))
  c.label_fraction = ml_collections.ConfigDict(dict(c.get('label_fraction') or {}))
  _check_values(c)
  if c.labels is not None:
    c.labels = tuple(int(x) for x in c.labels)
  return c


def _check_values(c: ml_collections.ConfigDict) -> None:
  for key in ('name', 'train_split', 'eval_split'):
    if not isinstance(c.get(key), str) or not c.get(key):
      raise ConfigError(f'data.{key} must be a non-empty string, got {c.get(key)!r}; set {_flag(key)}')
  if c.get('data_dir') is not None and not isinstance(c.data_dir, str):
    raise ConfigError(f'data.data_dir must be a path or None, got {c.data_dir!r}; '
                      f'set {_flag("data_dir")}')
  labels = c.get('labels')
  if labels is not None:
    if (not isinstance(labels, (tuple, list)) or not labels or not all(_is_int(x) for x in labels)
        or min(labels) < 0 or len(set(labels)) != len(labels)):
      raise ConfigError(f'data.labels must be a non-empty tuple of distinct class ids >= 0, got '
                        f"{labels!r}; set {_flag('labels')}, e.g. '(5,6,7,8,9)', or None for all")
  shots = c.get('shots')
  if shots is not None and (not _is_int(shots) or shots <= 0):
    raise ConfigError(f"data.shots must be a positive int or None, got {shots!r}; set {_flag('shots')}")
  for key, low in (('shots_seed', None), ('crop_padding', 0), ('shuffle_buffer', 1)):
    value = c.get(key)
    if not _is_int(value) or (low is not None and value < low):
      bound = '' if low is None else f' >= {low}'
      raise ConfigError(f'data.{key} must be an int{bound}, got {value!r}; set {_flag(key)}')
  size = c.get('image_size')
  if size is not None and (not _is_int(size) or size <= 0):
    raise ConfigError(f'data.image_size must be a positive int or None, got {size!r}; '
                      f"set {_flag('image_size')}")
  per_class = c.get('per_class')
  if not _is_int(per_class) or per_class < 0 or per_class == 1:
    raise ConfigError(f'data.per_class must be 0 (off) or an int >= 2, got {per_class!r}; '
                      f"set {_flag('per_class')}")
  if per_class and not c.get('cache'):
    raise ConfigError("data.per_class (class-balanced batches) needs the split in memory; set "
                      f"{_flag('cache')}=True or {_flag('per_class')}=0")
  for key in ('augment', 'cache'):
    if not isinstance(c.get(key), bool):
      raise ConfigError(f'data.{key} must be True or False, got {c.get(key)!r}; set {_flag(key)}')
  parse_normalize(c.get('normalize'))
  _check_crop(c)
  _check_label_fraction(c)
  fraction = c.get('folder_test_fraction')
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
    raise ConfigError(f'data.folder_test_fraction must be a number in (0, 1), got {fraction!r}; '
                      f"set {_flag('folder_test_fraction')}")


def _check_label_fraction(c: ml_collections.ConfigDict) -> None:
  for feature, fraction in c.label_fraction.items():
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
      raise ConfigError(f'data.label_fraction.{feature} must be a number in (0, 1], got {fraction!r}; '
                        f"set {_flag('label_fraction')}.{feature}")
  if c.label_fraction and not c.get('cache'):
    raise ConfigError("data.label_fraction draws the labelled examples of the split in memory; set "
                      f"{_flag('cache')}=True or {_flag('label_fraction')}={{}}")
  if c.get('per_class') and 'label' in c.label_fraction:
    raise ConfigError("data.per_class groups the training examples by their label, which "
                      "data.label_fraction.label hides; set one of them off")


CROPS = ('resize', 'inception')


def _check_crop(c: ml_collections.ConfigDict) -> None:
  if c.get('crop') not in CROPS:
    raise ConfigError(f"data.crop must be one of {', '.join(map(repr, CROPS))}, got {c.get('crop')!r}; "
                      f"set {_flag('crop')}")
  if not isinstance(c.get('flip'), bool):
    raise ConfigError(f"data.flip must be True or False, got {c.get('flip')!r}; set {_flag('flip')}")
  area = c.get('crop_area')
  if (not isinstance(area, (tuple, list)) or len(area) != 2
      or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in area)
      or not 0 < area[0] <= area[1] <= 1):
    raise ConfigError(f"data.crop_area must be (low, high) with 0 < low <= high <= 1, got {area!r}; "
                      f"set {_flag('crop_area')}, e.g. '(0.08,1.0)'")
  fraction = c.get('center_crop')
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
    raise ConfigError(f"data.center_crop must be a number in (0, 1], got {fraction!r}; "
                      f"set {_flag('center_crop')}")
  if c.crop == 'inception' and c.get('image_size') is None:
    raise ConfigError("data.crop='inception' crops to a square of data.image_size; set "
                      f"{_flag('image_size')} (e.g. 224)")
  if c.crop == 'inception' and c.get('augment'):
    raise ConfigError("data.crop='inception' crops already; set --config.data.augment=False (the "
                      "zero-padded random crop is for data.crop='resize')")
