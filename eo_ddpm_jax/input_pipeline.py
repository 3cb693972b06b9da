"""Training input pipeline: TFDS data source -> grain -> device batches.

Owns the study's preprocessing of a SEN12MS RGB patch (uint16 digital numbers,
[256, 256, 3] HWC) into a model input (float32 [S, S, 3] in [-1, 1]):

  DN / dn_scale, clipped to [0, 1] -> x ** (1 / gamma) -> * 255 -> antialiased
  (triangle-filter) resize to S x S -> random horizontal flip -> x / 127.5 - 1.

and the order in which examples are read: a seeded shuffle that differs per epoch,
drop-remainder batches, each host reading its own disjoint slice of every global
batch, and an iterator whose grain state (`get_state`/`set_state`) resumes
exactly. Preprocessing runs on the host CPUs (grain worker processes when
`config.data.num_workers > 0`; they need absl flags parsed first, so run the
program under `absl.app.run`). bench/input_pipeline.py measured this against
resizing on the accelerator; see bench/RESULTS.md.
"""

import copy
import functools
import queue
import threading
from typing import Any, Iterator

import grain
import jax
import numpy as np

# Largest uint16 digital number plus one: the size of the gamma lookup table.
_NUM_DN = np.iinfo(np.uint16).max + 1
# Pixel range after the gamma step, as in the study's 8-bit-style images.
_PIXEL_MAX = 255.0
# Stream id mixed into the flip seed so flips are independent of the shuffle.
_FLIP_STREAM = 1


def make_source(data_config):
  """Opens the built TFDS dataset as a random-access source (no TensorFlow).

  Args:
    data_config: `config.data`; uses `dataset`, `split` and `data_dir`.

  Returns:
    A source with `__len__` and `__getitem__` whose records are dicts with
    'image' (uint16 [256, 256, 3], R, G, B digital numbers) and metadata.

  Raises:
    FileNotFoundError: the dataset is not built under `data_dir`; the message
      gives the build command.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    import tfds_sen12ms  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass  # Reading a built dataset only needs its metadata files.
  try:
    return tfds.data_source(
        data_config.dataset, split=data_config.split,
        data_dir=data_config.data_dir)
  except Exception as e:  # TFDS raises several types for a missing dataset.
    config_name = data_config.dataset.partition('/')[2] or 'summer_rgb'
    raise FileNotFoundError(
        f'Cannot open TFDS dataset {data_config.dataset!r} split '
        f'{data_config.split!r} under data_dir={data_config.data_dir!r} ({e}). '
        'Build it first: python -m tfds_sen12ms.build --manual_dir=<SEN12MS dir> '
        f'--data_dir={data_config.data_dir} --config={config_name}') from e


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Number of full global batches in one epoch (the remainder is dropped)."""
  return num_examples // global_batch_size


@functools.lru_cache(maxsize=None)
def gamma_table(dn_scale: float, gamma: float) -> np.ndarray:
  """float32 [65536]: entry d = clip(d / dn_scale, 0, 1) ** (1 / gamma) * 255.

  The gamma step depends only on the uint16 digital number, so one table lookup
  per pixel replaces a float power (about 20x cheaper on a CPU).
  """
  x = np.minimum(np.arange(_NUM_DN, dtype=np.float64) / dn_scale, 1.0)
  return (x ** (1.0 / gamma) * _PIXEL_MAX).astype(np.float32)


@functools.lru_cache(maxsize=None)
def resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Antialiased linear (triangle filter) resampling as taps per output pixel.

  The filter is widened by the downscale factor (antialiasing), pixel centres
  sit at i + 0.5, out-of-range taps are dropped and the weights renormalised.

  Returns:
    (indices, weights): int [out_size, K] input pixel indices and float32
    [out_size, K] weights summing to 1 per row; output o = sum_k w[o, k] *
    input[indices[o, k]].
  """
  scale = in_size / out_size
  support = max(scale, 1.0)  # Half-width of the triangle, in input pixels.
  centers = (np.arange(out_size) + 0.5) * scale
  first = np.floor(centers - support).astype(np.int64)
  num_taps = int(np.ceil(2 * support)) + 1
  indices = first[:, None] + np.arange(num_taps)[None, :]
  weights = np.maximum(
      0.0, 1.0 - np.abs((indices + 0.5 - centers[:, None]) / support))
  weights = np.where((indices >= 0) & (indices < in_size), weights, 0.0)
  used = weights.sum(axis=0) > 0  # Drop tap columns that are zero everywhere.
  indices = np.clip(indices[:, used], 0, in_size - 1)
  weights = weights[:, used]
  weights /= weights.sum(axis=1, keepdims=True)
  return indices, weights.astype(np.float32)


def _resize_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
  indices, weights = resize_taps(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  out = None
  for k in range(indices.shape[1]):
    term = np.take(x, indices[:, k], axis=axis) * weights[:, k].reshape(shape)
    out = term if out is None else out + term
  return out


def preprocess_image(image: np.ndarray, data_config, flip: bool) -> np.ndarray:
  """The study's preprocessing of one patch, on the host.

  Args:
    image: uint16 [H, W, 3] HWC digital numbers (reflectance x 10000).
    data_config: `config.data`; uses `dn_scale`, `gamma`, `image_size`.
    flip: mirror left-right (the random horizontal flip, drawn by the caller).

  Returns:
    float32 [S, S, 3] in [-1, 1], S = `image_size`.
  """
  if image.dtype != np.uint16:
    raise TypeError(f'Expected uint16 digital numbers, got {image.dtype}.')
  x = gamma_table(float(data_config.dn_scale), float(data_config.gamma))[image]
  size = data_config.image_size
  x = _resize_axis(_resize_axis(x, 0, size), 1, size)
  if flip:
    x = x[:, ::-1]
  return x * np.float32(2.0 / _PIXEL_MAX) - np.float32(1.0)


def flip_draw(seed: int, position: int) -> bool:
  """The horizontal-flip coin for the example at a global stream position.

  A pure function of (seed, position), so a resumed run draws the same flips.
  """
  rng = np.random.default_rng((seed, _FLIP_STREAM, position))
  return bool(rng.integers(2))


class _LoadExample(grain.transforms.MapWithIndex):
  """Maps a host-local stream position to that host's preprocessed example.

  Global stream position g = epoch * num_examples + i, where i indexes that
  epoch's permutation. Within an epoch, global batch j holds positions
  [j * G, (j + 1) * G), and host p reads [j * G + p * L, j * G + (p + 1) * L)
  (G global, L local batch size); positions past the last full batch are
  never read (drop-remainder).
  """

  def __init__(self, source, data_config, *, seed, global_batch_size,
               local_batch_size, process_index):
    self._source = source
    self._data_config = data_config
    self._seed = seed
    self._global_batch = global_batch_size
    self._local_batch = local_batch_size
    self._process_index = process_index
    self._num_examples = len(source)
    self._local_per_epoch = (
        steps_per_epoch(self._num_examples, global_batch_size)
        * local_batch_size)
    # Permutation per epoch: grain's shuffle reseeds with each multiple of
    # len, so order[e * n + i] is the i-th index of epoch e's permutation.
    self._order = grain.MapDataset.range(self._num_examples).shuffle(seed=seed)

  def global_position(self, local_position: int) -> int:
    epoch, rest = divmod(local_position, self._local_per_epoch)
    step, offset = divmod(rest, self._local_batch)
    return (epoch * self._num_examples + step * self._global_batch
            + self._process_index * self._local_batch + offset)

  def map_with_index(self, index: int, element: Any) -> dict[str, np.ndarray]:
    del element  # The position alone decides the example.
    position = self.global_position(index)
    record = self._source[self._order[position] % self._num_examples]
    flip = bool(self._data_config.random_flip) and flip_draw(
        self._seed, position)
    return {'image': preprocess_image(
        np.asarray(record['image']), self._data_config, flip)}


def create_train_dataset(source, data_config, *, global_batch_size: int,
                         seed: int, num_epochs: int | None,
                         process_index: int | None = None,
                         process_count: int | None = None,
                         read_options: grain.ReadOptions | None = None
                         ) -> grain.IterDataset:
  """The training stream of host-local, preprocessed batches.

  Args:
    source: random-access source (`len`, `[i]`) of dicts with 'image' uint16
      [H, W, 3]; e.g. `make_source(config.data)`.
    data_config: `config.data`.
    global_batch_size: batch size over all hosts; divisible by process_count.
    seed: drives the shuffle (different in every epoch) and the flips.
    num_epochs: epochs to produce, or None to repeat forever.
    process_index, process_count: this host's slice; default to
      `jax.process_index()` and `jax.process_count()` (overridable for tests).
    read_options: grain threads and buffer per process; defaults from
      `data_config.read_threads` and `data_config.read_buffer_size`.

  Returns:
    An IterDataset of {'image': float32 [global_batch_size // process_count,
    S, S, 3] in [-1, 1]}, steps_per_epoch(len(source), global_batch_size)
    batches per epoch. `iter()` of it has `get_state()`/`set_state()`; a state
    restores the stream exactly, but only with the same num_workers.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible '
                     f'by the number of hosts ({process_count}).')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is outside '
                     f'[0, {process_count}).')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be None or >= 1, got {num_epochs}.')
  num_steps = steps_per_epoch(len(source), global_batch_size)
  if num_steps == 0:
    raise ValueError(f'The source has {len(source)} examples, fewer than one '
                     f'global batch of {global_batch_size}.')
  local_batch_size = global_batch_size // process_count
  load = _LoadExample(
      source, data_config, seed=seed, global_batch_size=global_batch_size,
      local_batch_size=local_batch_size, process_index=process_index)
  ds = (grain.MapDataset.range(num_steps * local_batch_size)
        .repeat(num_epochs)
        .map_with_index(load)
        .batch(local_batch_size, drop_remainder=True))
  if read_options is None:
    read_options = grain.ReadOptions(
        num_threads=data_config.read_threads,
        prefetch_buffer_size=data_config.read_buffer_size)
  ds = ds.to_iter_dataset(read_options)
  if data_config.num_workers > 0:
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.num_workers))
  return ds


class DevicePrefetchIterator:
  """Global device batches, `size` ahead of the consumer, from a host iterator.

  A background thread pulls host-local batches and assembles global jax.Arrays
  with `jax.make_array_from_process_local_data`. Because the thread runs ahead,
  the host iterator's own state is not the consumer's position: checkpoint
  `get_state()` of this object instead, and restore it with
  `host_iterator.set_state(state)` before wrapping it again.
  """

  def __init__(self, iterator, sharding, size: int):
    if size < 1:
      raise ValueError(f'prefetch size must be >= 1, got {size}.')
    self._iterator = iterator
    self._sharding = sharding
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._state = self._host_state()
    self._done = False
    self._thread = threading.Thread(target=self._fill, daemon=True)
    self._thread.start()

  def _host_state(self):
    get_state = getattr(self._iterator, 'get_state', None)
    return copy.deepcopy(get_state()) if get_state else None

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self):
    try:
      for batch in self._iterator:
        arrays = jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                self._sharding, np.asarray(x)), batch)
        # The state after this batch is what resumes at the batch after it.
        if not self._put(('batch', arrays, self._host_state())):
          return
      self._put(('end', None, None))
    except Exception as e:  # pylint: disable=broad-except
      self._put(('error', e, None))  # Re-raised in the consumer's thread.

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._done:
      raise StopIteration
    kind, value, state = self._queue.get()
    if kind == 'end':
      self._done = True
      raise StopIteration
    if kind == 'error':
      self._done = True
      raise value
    self._state = state
    return value

  def get_state(self):
    """Host iterator state after the last batch returned by `next`."""
    return copy.deepcopy(self._state)

  def close(self):
    """Stops the background thread (the host iterator is left open)."""
    self._stop.set()
    self._thread.join()


def device_prefetch(iterator: Iterator[Any], sharding,
                    size: int) -> DevicePrefetchIterator:
  """Puts host-local batches onto devices, `size` batches ahead.

  Args:
    iterator: host-local batches (pytrees of numpy arrays [local_batch, ...]),
      e.g. `iter(create_train_dataset(...))`.
    sharding: e.g. `NamedSharding(mesh, P('data'))`; the leading (batch) axis
      of every leaf is split over 'data', each host supplying its own rows.
    size: batches held on the devices ahead of the consumer
      (`config.data.prefetch`).

  Returns:
    An iterator of the same pytrees as global jax.Arrays [global_batch, ...],
    with `get_state()` for exact resume and `close()`.
  """
  return DevicePrefetchIterator(iterator, sharding, size)
