r"""Throughput of the training input pipeline, and where preprocessing should run.

Measures images/s of `create_train_dataset` (host-side preprocessing to
128 x 128) with 0, 1, 2, ... grain worker processes, the per-image cost of each
host step, and the alternative: shipping uint16 patches and doing gamma + resize
inside a jitted function on the JAX default backend. Prints a table and appends
it to bench/RESULTS.md with the machine, versions and command.

Source: an in-memory list of random uint16 [256, 256, 3] patches (no decoding),
or with --data_dir a built TFDS dataset (array_record; each read decompresses one record).

  python -m bench.input_pipeline --workers=0,1,2
  python -m bench.input_pipeline --data_dir=data/demo/tfds --workers=0,1,2
"""

import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from eo_ddpm_jax import input_pipeline

_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'grain worker counts.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 40, 'Timed batches per run.')
_WARMUP = flags.DEFINE_integer('warmup_batches', 5, 'Untimed batches first.')
_NUM_PATCHES = flags.DEFINE_integer('num_patches', 128, 'In-memory patches.')
_PATCH = flags.DEFINE_integer('patch_size', 256, 'Side of a raw patch.')
_MAX_DN = flags.DEFINE_integer('max_dn', 10000, 'Random DNs in [0, max_dn).')
_READ_THREADS = flags.DEFINE_integer(
    'read_threads', None, 'grain ReadOptions.num_threads (None: config).')
_READ_BUFFER = flags.DEFINE_integer(
    'read_buffer', None, 'grain ReadOptions.prefetch_buffer_size (batches).')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Built TFDS dir; default: the in-memory source.')
_RESULTS = flags.DEFINE_string('results', 'bench/RESULTS.md', 'Appended to.')


def _in_memory_source():
  rng = np.random.default_rng(0)
  shape = (_PATCH.value, _PATCH.value, 3)
  return [{'image': rng.integers(0, _MAX_DN.value, shape, dtype=np.uint16)}
          for _ in range(_NUM_PATCHES.value)]


def _pipeline_rate(source, data_config, num_workers):
  """images/s of the host pipeline, after warm-up (worker start-up excluded)."""
  data_config = data_config.copy_and_resolve_references()
  data_config.num_workers = num_workers
  if _READ_THREADS.value is not None:
    data_config.read_threads = _READ_THREADS.value
  if _READ_BUFFER.value is not None:
    data_config.read_buffer_size = _READ_BUFFER.value
  ds = input_pipeline.create_train_dataset(
      source, data_config, global_batch_size=_BATCH.value, seed=0,
      num_epochs=None)
  it = iter(ds)
  for _ in range(_WARMUP.value):
    next(it)
  start = time.perf_counter()
  for _ in range(_NUM_BATCHES.value):
    batch = next(it)
  elapsed = time.perf_counter() - start
  assert batch['image'].shape[0] == _BATCH.value
  if hasattr(it, 'close'):
    it.close()
  return _NUM_BATCHES.value * _BATCH.value / elapsed


def _per_image_ms(fn, repeats=50):
  fn()
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats * 1e3


def _host_steps(image, data_config):
  """ms per image of each host step, and of a naive float power for contrast."""
  table = input_pipeline.gamma_table(data_config.dn_scale, data_config.gamma)
  gamma = table[image]
  size = data_config.image_size
  return {
      'naive gamma (float pow)': _per_image_ms(lambda: (np.clip(
          image / data_config.dn_scale, 0, 1) ** (1 / data_config.gamma)
                                                         * 255).astype(
                                                             np.float32)),
      'gamma lookup table': _per_image_ms(lambda: table[image]),
      'antialiased resize': _per_image_ms(lambda: input_pipeline._resize_axis(  # pylint: disable=protected-access
          input_pipeline._resize_axis(gamma, 0, size), 1, size)),  # pylint: disable=protected-access
      'whole preprocess_image': _per_image_ms(
          lambda: input_pipeline.preprocess_image(image, data_config, True)),
  }


def _device_preprocess(images, dn_scale, gamma, size):
  """The device-side alternative: uint16 [B, H, W, 3] -> float32 [B, S, S, 3]."""
  x = jnp.clip(images.astype(jnp.float32) / dn_scale, 0.0, 1.0)
  x = x ** (1.0 / gamma) * 255.0
  x = jax.image.resize(x, (x.shape[0], size, size, 3), 'linear', antialias=True)
  return x / 127.5 - 1.0


def _device_rates(source, data_config):
  """images/s of transfer + jitted preprocessing (uint16) vs transfer (float)."""
  batch = np.stack([source[i % len(source)]['image']
                    for i in range(_BATCH.value)])
  size = data_config.image_size
  fn = jax.jit(lambda x: _device_preprocess(
      x, data_config.dn_scale, data_config.gamma, size))
  processed = np.zeros((_BATCH.value, size, size, 3), np.float32)

  def uint16_path():
    return fn(jax.device_put(batch)).block_until_ready()

  def float_path():
    return jax.device_put(processed).block_until_ready()

  rates = {}
  for name, path in [('device: put uint16 + jitted gamma/resize', uint16_path),
                     ('device: put preprocessed float32', float_path)]:
    ms = _per_image_ms(path, repeats=_NUM_BATCHES.value)
    rates[name] = _BATCH.value / ms * 1e3
  return rates


def _cmd(args):
  return subprocess.run(args, capture_output=True, text=True,
                        check=False).stdout.strip()


def main(argv):
  del argv
  data_config = default.get_config().data
  if _DATA_DIR.value:
    data_config.data_dir = _DATA_DIR.value
    source = input_pipeline.make_source(data_config)
    source_name = (f'TFDS {data_config.dataset} split {data_config.split} at '
                   f'{_DATA_DIR.value} ({len(source)} examples, array_record)')
  else:
    source = _in_memory_source()
    source_name = (f'in-memory list of {len(source)} random uint16 '
                   f'[{_PATCH.value}, {_PATCH.value}, 3] patches')
  lines = [f'## input pipeline ({time.strftime("%Y-%m-%d %H:%M")})', '',
           f'- command: `{" ".join([os.path.basename(sys.executable)] + sys.argv)}`',
           f'- machine: `{_cmd(["uname", "-a"])}`, nproc={os.cpu_count()}, '
           f'{platform.python_version()}',
           f'- versions: jax {jax.__version__} ({jax.default_backend()}: '
           f'{jax.devices()[0].device_kind}), grain {_grain_version()}, '
           f'numpy {np.__version__}',
           f'- source: {source_name}; output {data_config.image_size}x'
           f'{data_config.image_size}, global batch {_BATCH.value}, '
           f'{_NUM_BATCHES.value} timed batches after {_WARMUP.value}; '
           f'read_threads={_READ_THREADS.value}, read_buffer='
           f'{_READ_BUFFER.value} (None: the pipeline default)',
           f'- load average before: {os.getloadavg()[0]:.1f}; CPU affinity: '
           f'{len(os.sched_getaffinity(0))} cores', '',
           '| pipeline | images/s |', '|---|---|']
  for workers in [int(w) for w in _WORKERS.value]:
    rate = _pipeline_rate(source, data_config, workers)
    lines.append(f'| host preprocessing, num_workers={workers} | {rate:.0f} |')
    print(lines[-1], flush=True)
  for name, rate in _device_rates(source, data_config).items():
    lines.append(f'| {name} | {rate:.0f} |')
    print(lines[-1], flush=True)
  lines += ['', '| host step, one image, one core | ms |', '|---|---|']
  image = np.asarray(source[0]['image'])
  for name, ms in _host_steps(image, data_config).items():
    lines.append(f'| {name} | {ms:.2f} |')
  lines.append('')
  text = '\n'.join(lines)
  print(text)
  with open(_RESULTS.value, 'a') as f:
    f.write(text + '\n')


def _grain_version():
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return metadata.version('grain')


if __name__ == '__main__':
  app.run(main)
