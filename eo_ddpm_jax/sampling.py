"""Image generation from (EMA) params: jitted samplers, batching, grids and files.

Owns `--mode=sample` (restore a checkpoint's EMA params, generate N images with DDPM
or DDIM, write a PNG grid and the raw float arrays) and the per-epoch sample grid
that training writes.
"""

import functools
import math
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from eo_ddpm_jax import checkpoints
from eo_ddpm_jax import config_check
from eo_ddpm_jax import diffusion
from eo_ddpm_jax import schedules
from eo_ddpm_jax import train_step as train_step_lib

# 8-bit pixel range of the written PNGs.
_PIXEL_MAX = 255.0


def make_sample_fn(config: ml_collections.ConfigDict, model, schedule: schedules.Schedule,
                   *, sampler: str, batch_size: int, ddim_steps: int, eta: float,
                   clip_denoised: bool) -> Callable[[Any, jax.Array], jax.Array]:
  """A jitted `sample(params, rng) -> float32 [batch_size, S, S, C]` in [-1, 1].

  Args:
    config: full config (data.image_size, model.channels, diffusion.*).
    model: the U-Net.
    schedule: float64 `Schedule`; sampled in float32.
    sampler: 'ddpm' (all T steps, ancestral) or 'ddim' (`ddim_steps` steps, `eta`).
  """
  schedule = schedules.schedule_as(schedule, jnp.float32)
  shape = (batch_size, config.data.image_size, config.data.image_size,
           config.model.channels)
  common = dict(objective=config.diffusion.objective,
                input_scale=config.diffusion.input_scale, clip_denoised=clip_denoised)
  if sampler == 'ddim':
    run = functools.partial(diffusion.ddim_sample, num_steps=ddim_steps, eta=eta, **common)
  elif sampler == 'ddpm':
    run = functools.partial(diffusion.ddpm_sample, **common)
  else:
    raise ValueError(f'sampler={sampler!r} is unknown; valid values: ddpm, ddim.')

  def sample(params, rng):
    def denoise_fn(x_t, t):
      return model.apply({'params': params}, x_t, t).astype(jnp.float32)
    return run(denoise_fn, schedule, shape, rng)

  return jax.jit(sample)


def generate(sample_fn: Callable, params: Any, rng: jax.Array, num_samples: int,
             batch_size: int) -> np.ndarray:
  """num_samples images from batches of `sample_fn`; batch i uses fold_in(rng, i).

  Returns:
    float32 numpy [num_samples, S, S, C] in [-1, 1].
  """
  batches = []
  for i in range(math.ceil(num_samples / batch_size)):
    batches.append(np.asarray(jax.device_get(sample_fn(params, jax.random.fold_in(rng, i)))))
  return np.concatenate(batches)[:num_samples].astype(np.float32)


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


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """--mode=sample: EMA params of a checkpoint -> `sample.num_samples` images on disk.

  Writes `<workdir>/samples/step_<step>_<sampler><steps>.png` (grid) and `.npy`
  (float32 [N, S, S, C] in [-1, 1]).

  Returns:
    {'png': path, 'npy': path}.
  Raises:
    FileNotFoundError: no checkpoint (or not the requested step) under workdir.
  """
  s = config.sample
  config_check.check_model_and_diffusion(config)
  model = train_step_lib.create_model(config.model)
  schedule = train_step_lib.create_schedule(config.diffusion)
  # The opt state's structure needs a schedule callable, not its values.
  tx = train_step_lib.create_optimizer(config.optim, optax.constant_schedule(0.0))
  image_shape = (config.data.image_size, config.data.image_size, config.model.channels)
  abstract = jax.eval_shape(
      functools.partial(train_step_lib.create_train_state, config, model, tx,
                        image_shape=image_shape),
      jax.random.PRNGKey(config.seed))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = checkpoints.abstract_with_sharding(abstract, jax.tree.map(lambda _: device, abstract))
  manager = checkpoints.open_manager(workdir)
  if s.checkpoint_step < 0:
    restored = checkpoints.restore_latest(manager, abstract, restore_data=False,
                                          move_aside=False)
  else:
    restored = checkpoints.restore_step(manager, s.checkpoint_step, abstract)
  if restored is None:
    raise FileNotFoundError(f'No checkpoint under {manager.directory}; train first '
                            f'(--mode=train --workdir={workdir}).')
  state, _, step = restored
  steps = s.ddim_steps if s.sampler == 'ddim' else config.diffusion.timesteps
  logging.info('Sampling %d images from step %d with %s (%d steps).',
               s.num_samples, step, s.sampler, steps)
  sample_fn = make_sample_fn(config, model, schedule, sampler=s.sampler,
                             batch_size=min(s.batch_size, s.num_samples),
                             ddim_steps=s.ddim_steps, eta=s.ddim_eta,
                             clip_denoised=s.clip_denoised)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), s.seed_offset)
  images = generate(sample_fn, state.ema_params, rng, s.num_samples,
                    min(s.batch_size, s.num_samples))
  stem = os.path.join(workdir, 'samples', f'step_{step}_{s.sampler}{steps}')
  save_png(stem + '.png', image_grid(images))
  np.save(stem + '.npy', images)
  return {'png': stem + '.png', 'npy': stem + '.npy'}
