"""Image generation from (EMA) params: jitted, sharded samplers, batching, grids and files.

Owns `--mode=sample` (restore a checkpoint's EMA params, generate N images with DDPM,
DDIM or DPM-Solver++(2M), write a PNG grid and the raw float arrays), the generation of
evaluation samples and the per-epoch sample grid that training writes.

Image i of a run with key `rng` is sampled from its own key `fold_in(rng, i)` (per-image
keys, see diffusion's module docstring), so a seed gives the same images whatever the
batch size or the number of devices the batch is sharded over.
"""

import functools
import math
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
from PIL import Image
import tqdm

from eo_ddpm_jax import checkpoints
from eo_ddpm_jax import config_check
from eo_ddpm_jax import diffusion
from eo_ddpm_jax import dpm_solver
from eo_ddpm_jax import run_config
from eo_ddpm_jax import schedules
from eo_ddpm_jax import train_step as train_step_lib

# 8-bit pixel range of the written PNGs.
_PIXEL_MAX = 255.0

SampleFn = Callable[[Any, jax.Array], jax.Array]


def sampler_steps(sampler: str, num_steps: int, timesteps: int) -> int:
  """Denoiser calls of a sampler: all T for 'ddpm', else num_steps."""
  return timesteps if sampler == 'ddpm' else num_steps


def make_sample_fn(config: ml_collections.ConfigDict, model, schedule: schedules.Schedule,
                   *, sampler: str, batch_size: int, num_steps: int, eta: float,
                   clip_denoised: bool, mesh: jax.sharding.Mesh | None = None) -> SampleFn:
  """A jitted `sample(params, keys) -> float32 [batch_size, S, S, C]` in [-1, 1].

  Image b is drawn from keys[b] alone (uint32 [batch_size, 2] keys).

  Args:
    config: full config (data.image_size, model.channels, diffusion.*).
    model: the U-Net.
    schedule: float64 `Schedule`; sampled in float32.
    sampler: 'ddpm' (all T steps, ancestral), 'ddim' (`num_steps` steps, `eta`) or
      'dpm_solver' (DPM-Solver++(2M), `num_steps` steps, deterministic given x_T).
    mesh: shard the batch over its 'data' axis (params replicated); batch_size must be
      divisible by its size. None: plain jit.
  """
  schedule = schedules.schedule_as(schedule, jnp.float32)
  shape = (batch_size, config.data.image_size, config.data.image_size,
           config.model.channels)
  common = dict(objective=config.diffusion.objective,
                input_scale=config.diffusion.input_scale, clip_denoised=clip_denoised)
  if sampler == 'ddim':
    run = functools.partial(diffusion.ddim_sample, num_steps=num_steps, eta=eta, **common)
  elif sampler == 'ddpm':
    run = functools.partial(diffusion.ddpm_sample, **common)
  elif sampler == 'dpm_solver':
    run = functools.partial(dpm_solver.dpm_solver_2m_sample, num_steps=num_steps, **common)
  else:
    raise ValueError(f'sampler={sampler!r} is unknown; valid values: '
                     f'{", ".join(config_check.SAMPLERS)}.')

  def sample(params, keys):
    def denoise_fn(x_t, t):
      return model.apply({'params': params}, x_t, t).astype(jnp.float32)
    return run(denoise_fn, schedule, shape, keys)

  if mesh is None:
    return jax.jit(sample)
  if batch_size % mesh.size:
    raise ValueError(f'batch_size={batch_size} must be divisible by the {mesh.size} '
                     f'devices it is sharded over.')
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(train_step_lib.with_mesh(sample, mesh), in_shardings=(replicated, split),
                 out_shardings=split)


def sharded_batch_size(batch_size: int, num_devices: int) -> int:
  """batch_size rounded up to a multiple of num_devices (the padding is discarded)."""
  return -(-batch_size // num_devices) * num_devices


def image_keys(rng: jax.Array, start: int, count: int) -> jax.Array:
  """uint32 [count, 2]: the keys fold_in(rng, i) of images i = start .. start + count - 1."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(
      jnp.arange(start, start + count, dtype=jnp.uint32))


def _to_host(images: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:  # Rows on other hosts' devices: gather them everywhere.
    images = multihost_utils.process_allgather(images, tiled=True)
  return np.asarray(jax.device_get(images))


def generate(sample_fn: SampleFn, params: Any, rng: jax.Array, num_samples: int,
             batch_size: int, *, progress: bool = False) -> np.ndarray:
  """num_samples images from calls of `sample_fn` on batch_size keys each.

  Image i comes from fold_in(rng, i): the same images for any batch_size or device
  count. The last batch is padded with the keys of images past the end (one compiled
  shape), whose outputs are dropped. The next batch is dispatched before the previous
  one is copied to the host, so the devices do not wait for the copy.

  Args:
    sample_fn: from make_sample_fn with this batch_size.
    params: the U-Net params (EMA), replicated or on one device.
    progress: show a tqdm bar (images) on the first host.
  Returns:
    float32 numpy [num_samples, S, S, C] in [-1, 1].
  """
  bar = tqdm.tqdm(total=num_samples, unit='img', desc='sampling',
                  disable=not (progress and jax.process_index() == 0))
  batches, pending = [], None
  for start in range(0, num_samples, batch_size):
    images = sample_fn(params, image_keys(rng, start, batch_size))
    if pending is not None:
      batches.append(_to_host(pending[1])[:pending[0]])
      bar.update(batches[-1].shape[0])
    pending = (min(batch_size, num_samples - start), images)
  if pending is not None:
    batches.append(_to_host(pending[1])[:pending[0]])
    bar.update(batches[-1].shape[0])
  bar.close()
  return np.concatenate(batches).astype(np.float32)


def image_grid(images: np.ndarray, num_cols: int | None = None) -> np.ndarray:
  """Tiles images into a grid, row-major, black where the last row is short.

  Args:
    images: float [N, H, W, C] in [-1, 1].
    num_cols: columns; default ceil(sqrt(N)) (25 images -> 5x5).

  Returns:
    uint8 [rows * H, cols * W, C].
  """
  n, h, w, c = images.shape
  cols = num_cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  pixels = np.rint((np.clip(images, -1.0, 1.0) + 1.0) / 2.0 * _PIXEL_MAX).astype(np.uint8)
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = pixels[i]
  return grid


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] grid as PNG (via a temporary file, then rename)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp'
  Image.fromarray(grid).save(tmp, format='PNG')
  os.replace(tmp, path)


def abstract_train_state(config: ml_collections.ConfigDict, model,
                         mesh: jax.sharding.Mesh) -> Any:
  """The TrainState's ShapeDtypeStructs, replicated over `mesh` (what a restore builds)."""
  # The opt state's structure needs a schedule callable, not its values.
  tx = train_step_lib.create_optimizer(config.optim, optax.constant_schedule(0.0))
  image_shape = (config.data.image_size, config.data.image_size, config.model.channels)
  abstract = jax.eval_shape(
      functools.partial(train_step_lib.create_train_state, config, model, tx,
                        image_shape=image_shape),
      jax.random.PRNGKey(config.seed))
  return checkpoints.abstract_with_sharding(
      abstract, train_step_lib.replicated_sharding(mesh, abstract))


def restore_ema_params(manager, abstract_state: Any, step: int, workdir: str
                       ) -> tuple[Any, int]:
  """(EMA params, step) of checkpoint `step` (-1: the newest that restores).

  Raises:
    FileNotFoundError: no checkpoint, or not the requested step (names the available).
  """
  if step < 0:
    restored = checkpoints.restore_latest(manager, abstract_state, restore_data=False,
                                          move_aside=False)
  else:
    restored = checkpoints.restore_step(manager, step, abstract_state)
  if restored is None:
    raise FileNotFoundError(f'No checkpoint under {manager.directory}; train first '
                            f'(--mode=train --workdir={workdir}).')
  state, _, step = restored
  return state.ema_params, step


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """--mode=sample: EMA params of a checkpoint -> `sample.num_samples` images on disk.

  The batch is sharded over all devices. Writes
  `<workdir>/samples/step_<step>_<sampler><steps>.png` (grid) and `.npy` (float32
  [N, S, S, C] in [-1, 1]).

  Returns:
    {'png': path, 'npy': path}.
  Raises:
    config_check.ConfigError: a model or diffusion setting unlike the run's config.json.
    FileNotFoundError: no checkpoint (or not the requested step) under workdir.
  """
  s = config.sample
  config_check.check_model_and_diffusion(config)
  config_check.check_sampler_steps(config, 'sample')
  run_config.check_matches_run(config, workdir)
  mesh = train_step_lib.make_mesh()
  model = train_step_lib.create_model(config.model)
  schedule = train_step_lib.create_schedule(config.diffusion)
  manager = checkpoints.open_manager(workdir)
  params, step = restore_ema_params(manager, abstract_train_state(config, model, mesh),
                                    s.checkpoint_step, workdir)
  steps = sampler_steps(s.sampler, s.ddim_steps, config.diffusion.timesteps)
  logging.info('Sampling %d images from step %d with %s (%d steps) on %d devices.',
               s.num_samples, step, s.sampler, steps, mesh.size)
  batch_size = sharded_batch_size(min(s.batch_size, s.num_samples), mesh.size)
  sample_fn = make_sample_fn(config, model, schedule, sampler=s.sampler,
                             batch_size=batch_size, num_steps=s.ddim_steps, eta=s.ddim_eta,
                             clip_denoised=s.clip_denoised, mesh=mesh)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), s.seed_offset)
  images = generate(sample_fn, params, rng, s.num_samples, batch_size,
                    progress=s.progress_bar)
  stem = os.path.join(workdir, 'samples', f'step_{step}_{s.sampler}{steps}')
  if jax.process_index() == 0:
    save_png(stem + '.png', image_grid(images))
    np.save(stem + '.npy', images)
  return {'png': stem + '.png', 'npy': stem + '.npy'}
