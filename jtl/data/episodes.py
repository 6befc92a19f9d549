"""N-way K-shot episodes for meta-learning, from a labelled split held in memory.

The episode protocol of Vinyals et al. 2016 ("Matching Networks for One Shot Learning", Sec. 2.1),
as used by prototypical networks (Snell et al. 2017) and MAML (Finn et al. 2017). An episode draws N
classes from the class pool, then K support and Q query examples of each class without
replacement, so support and query are disjoint. Labels are episode-local: the n-th class drawn is
label n. The draw order is random, so a class has no fixed label across episodes, and a learner
must read the class assignment off the support set.

Batch layout, E episodes per step (`config.batch_size` counts episodes, so the trainer shards
episodes over the data axis):

  {'support': {'image': f32 [E, N*K, H, W, C], 'label': i32 [E, N*K]},
   'query':   {'image': f32 [E, N*Q, H, W, C], 'label': i32 [E, N*Q]}}

Rows are class-major: support row n*K + k is shot k of the episode's class n (label n), and
likewise for the queries.

Class pool: `config.data` selects it. `labels` keeps those classes (remapped to 0..C-1; without
`labels`, every class present in the split, in the order of its ids). The split
is `train_split` for training (where `data.shots`, if set, caps each class) and the evaluator's
split for evaluation. The digits protocol meta-trains on classes 0-4 of the train split and
meta-tests on classes 5-9 of the test split. The two pools share no class and no image, so no
meta-test class is ever seen in meta-training; `tests/test_episodes.py` checks this on the images
themselves. With only 5 source classes, every 5-way training episode holds all of them: episodes
differ in their examples and in which label each class gets.

Determinism: episode e of step s is a function of (seed, s, e) alone. Its draws come from a NumPy
generator seeded with SeedSequence([stream, seed, s, e]), so resuming at any step yields exactly the
uninterrupted stream, at no cost. Host h of P takes episodes [h*E/P, (h+1)*E/P) of every step, so
the global batch does not depend on the number of hosts. Evaluation episodes come from another
stream, keyed by (seed, episode index) (`fixed_episodes`).

Rotations as classes (`data.episodes.rotations`, training episodes only): with R = 4 (or 2) the
training pool of C classes becomes R*C classes, class c + r*C holding class c's images turned by
r * 360/R degrees (counter-clockwise), as Snell et al. (2017) and Vinyals et al. (2016) enlarge
Omniglot's background set. A rotated character is a new class even where it looks like another one
(n and u); evaluation episodes are never rotated. Needs square images.

Episodes are not augmented (`data.augment` must be False). The pool is always loaded into memory
(`data.cache` is not consulted): episodic datasets are small.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from jtl.data import config as config_lib
from jtl.data import pipeline, preprocess, source
from jtl.errors import ConfigError

# Stream tags folded into the seed, so training and evaluation episodes are independent draws.
TRAIN_STREAM, EVAL_STREAM = 1, 2


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
  """N-way (`ways`), K-shot (`shots`) episodes with `queries` query examples per class."""
  ways: int
  shots: int
  queries: int
  rotations: int = 1


@dataclasses.dataclass(frozen=True)
class ClassPool:
  """A labelled split in memory: normalised images, remapped labels and each class's rows."""
  images: np.ndarray  # float32 [M, H, W, C], normalised as `data.normalize` says
  labels: np.ndarray  # int32 [M], class ids 0..C-1 (positions in `data.labels`)
  rows: tuple[np.ndarray, ...]  # rows[c]: the indices of class c's examples, ascending


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def episode_spec(data_config: ml_collections.ConfigDict) -> EpisodeSpec:
  """The `data.episodes` section over its defaults, checked; ways == 0 means no episodes."""
  defaults = dict(config_lib.default_data_config().episodes.items())
  given = dict((data_config.get("episodes") or {}).items())
  for key in given:
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown option data.episodes.{key}{hint}; valid: {', '.join(defaults)}")
  options = {**defaults, **given}
  for key, low in (("ways", 0), ("shots", 1), ("queries", 1)):
    if not _is_int(options[key]) or options[key] < low:
      raise ConfigError(f"data.episodes.{key} must be an integer >= {low}, got {options[key]!r}; "
                        f"set --config.data.episodes.{key}")
  if options["rotations"] not in (1, 2, 4) or not _is_int(options["rotations"]):
    raise ConfigError(f"data.episodes.rotations must be 1, 2 or 4 (copies of each training class "
                      f"turned by multiples of 360/R degrees), got {options['rotations']!r}; set "
                      "--config.data.episodes.rotations")
  if options["ways"] == 1:
    raise ConfigError("data.episodes.ways=1 gives episodes with nothing to tell apart; set "
                      "--config.data.episodes.ways to 2 or more (0: no episodes)")
  return EpisodeSpec(**{k: int(options[k]) for k in ("ways", "shots", "queries", "rotations")})


def enabled(data_config: ml_collections.ConfigDict) -> bool:
  """Whether the data config asks for episode batches (`data.episodes.ways > 0`)."""
  return episode_spec(data_config).ways > 0


def class_pool(data_config: ml_collections.ConfigDict, split: str) -> ClassPool:
  """The filtered `split` of `data_config` in memory, normalised like every other batch."""
  c = source.validate(data_config)
  images, targets = pipeline.load_in_memory(c, split)
  to_float = preprocess.normalizer(config_lib.parse_normalize(c.normalize))
  images = to_float(tf.constant(images)).numpy()
  labels = targets["label"].astype(np.int32)
  if c.labels is None:  # every class present in the split (e.g. glyphs' test split: ids 1238..)
    present, labels = np.unique(labels, return_inverse=True)
    labels = labels.astype(np.int32)
    num_classes = len(present)
  else:
    num_classes = len(c.labels)
  rows = tuple(np.flatnonzero(labels == k) for k in range(num_classes))
  return ClassPool(images, labels, rows)


def rotated_pool(pool: ClassPool, rotations: int) -> ClassPool:
  """`pool` with `rotations` - 1 turned copies of every class as new classes (module docstring)."""
  if rotations == 1:
    return pool
  height, width = pool.images.shape[1:3]
  if height != width:
    raise ConfigError(f"data.episodes.rotations={rotations} turns images by multiples of "
                      f"{360 // rotations} degrees, which needs square images; these are "
                      f"{height}x{width}; set --config.data.episodes.rotations=1")
  quarter_turns = 4 // rotations
  num, num_classes = len(pool.labels), len(pool.rows)
  images = np.concatenate([np.rot90(pool.images, r * quarter_turns, axes=(1, 2))
                           for r in range(rotations)])
  labels = np.concatenate([pool.labels + r * num_classes for r in range(rotations)])
  rows = tuple(rows + r * num for r in range(rotations) for rows in pool.rows)
  return ClassPool(np.ascontiguousarray(images), labels.astype(np.int32), rows)


def check_pool(pool: ClassPool, spec: EpisodeSpec, where: str) -> None:
  """ConfigError unless the pool has `ways` classes with `shots + queries` examples each."""
  usable = [k for k, r in enumerate(pool.rows) if len(r)]
  if len(usable) < spec.ways:
    raise ConfigError(f"{where}: {spec.ways}-way episodes need {spec.ways} classes but the pool "
                      f"has {len(usable)}; lower data.episodes.ways or widen data.labels")
  need = spec.shots + spec.queries
  for k, r in enumerate(pool.rows):
    if len(r) < need:
      raise ConfigError(f"{where}: class {k} (position in data.labels) has {len(r)} examples but "
                        f"an episode draws shots + queries = {need} of each class; lower "
                        "data.episodes.shots or data.episodes.queries")


def episode_rng(stream: int, seed: int, *indices: int) -> np.random.Generator:
  """The generator of one episode: a function of (stream, seed, indices) only."""
  return np.random.default_rng(np.random.SeedSequence(
      [stream, seed & 0xFFFFFFFFFFFFFFFF, *(int(i) for i in indices)]))


def draw_episode(pool: ClassPool, spec: EpisodeSpec, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(support rows [N*K], query rows [N*Q], classes [N]): pool rows, class-major, disjoint."""
  classes = rng.choice(len(pool.rows), spec.ways, replace=False)
  support, query = [], []
  for k in classes:
    drawn = pool.rows[k][rng.choice(len(pool.rows[k]), spec.shots + spec.queries, replace=False)]
    support.append(drawn[:spec.shots])
    query.append(drawn[spec.shots:])
  return np.concatenate(support), np.concatenate(query), classes.astype(np.int32)


def episode_labels(spec: EpisodeSpec, per_class: int) -> np.ndarray:
  """int32 [N*per_class]: the episode-local labels of class-major rows."""
  return np.repeat(np.arange(spec.ways, dtype=np.int32), per_class)


def episode_batch(pool: ClassPool, spec: EpisodeSpec, support_rows: np.ndarray,
                  query_rows: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
  """The batch of episodes whose rows are `support_rows` [E, N*K] and `query_rows` [E, N*Q]."""
  num = len(support_rows)
  return {
      "support": {"image": pool.images[support_rows],
                  "label": np.tile(episode_labels(spec, spec.shots), (num, 1))},
      "query": {"image": pool.images[query_rows],
                "label": np.tile(episode_labels(spec, spec.queries), (num, 1))},
  }


def fixed_episodes(pool: ClassPool, spec: EpisodeSpec, num_episodes: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(support rows [n, N*K], query rows [n, N*Q], classes [n, N]) of `num_episodes` evaluation
  episodes: episode i is a function of (seed, i) only, so every checkpoint sees the same ones."""
  draws = [draw_episode(pool, spec, episode_rng(EVAL_STREAM, seed, i)) for i in range(num_episodes)]
  return tuple(np.stack(parts) for parts in zip(*draws))


def train_iterator(data_config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                   start_step: int = 0, process_index: int = 0, process_count: int = 1
                   ) -> Iterator[dict[str, dict[str, np.ndarray]]]:
  """Infinite iterator of host-local episode batches (layout in the module docstring).

  `global_batch_size` is the number of episodes per step (E). The contract is that of
  `jtl.data.pipeline.train_iterator`: starting at `start_step` yields exactly what an uninterrupted
  iterator yields from that step on. Everything is checked before the first batch is asked for.
  """
  c = source.validate(data_config)
  spec = episode_spec(c)
  if spec.ways == 0:
    raise ConfigError("data.episodes.ways is 0 (no episodes); set --config.data.episodes.ways")
  if c.mixture:
    raise ConfigError("data.mixture and data.episodes cannot be combined; drop one of them")
  if c.augment:
    raise ConfigError("episodes are not augmented; set --config.data.augment=False")
  if c.per_class:
    raise ConfigError("data.per_class (class-balanced batches) does not apply to episodes, which "
                      "draw their own classes; set --config.data.per_class=0")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(f"batch_size={global_batch_size} episodes must be a positive multiple of the "
                      f"{process_count} processes; set --config.batch_size")
  if start_step < 0:
    raise ConfigError(f"start_step={start_step} must be >= 0")
  pool = rotated_pool(class_pool(c, c.train_split), spec.rotations)
  check_pool(pool, spec, f"split {c.train_split!r}")
  local = global_batch_size // process_count
  episodes = range(process_index * local, (process_index + 1) * local)

  def batches() -> Iterator[dict[str, dict[str, np.ndarray]]]:
    for step in itertools.count(start_step):
      draws = [draw_episode(pool, spec, episode_rng(TRAIN_STREAM, seed, step, e)) for e in episodes]
      yield episode_batch(pool, spec, np.stack([d[0] for d in draws]),
                          np.stack([d[1] for d in draws]))

  return batches()
