"""Validation of a config before any compute: each error names the key and valid values."""

import os

import jax
import ml_collections
import numpy as np

from eo_ddpm_jax import schedules
from eo_ddpm_jax import unet

SAMPLERS = ('ddpm', 'ddim', 'dpm_solver')
COMPUTE_DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _check_betas_file(d: ml_collections.ConfigDict) -> None:
  """The `custom` schedule's .npy file exists and holds [diffusion.timesteps] betas."""
  _require(os.path.isfile(d.betas_file),
           f'diffusion.betas_file={d.betas_file!r} is not a file; diffusion.schedule='
           f'{schedules.CUSTOM_SCHEDULE!r} needs a .npy file of the betas (an imported run '
           f'keeps it as <workdir>/betas.npy).')
  shape = np.load(d.betas_file, mmap_mode='r').shape  # Reads the header only.
  _require(shape == (d.timesteps,),
           f'diffusion.betas_file={d.betas_file!r} holds shape {shape}, but '
           f'diffusion.timesteps={d.timesteps}: they must agree.')


def check_model_and_diffusion(config: ml_collections.ConfigDict) -> None:
  """Checks schedule, objective, samplers, dtype and U-Net/image-size compatibility."""
  d, m = config.diffusion, config.model
  names = (*schedules.SCHEDULES, schedules.CUSTOM_SCHEDULE)
  _require(d.schedule in names,
           f'diffusion.schedule={d.schedule!r} is unknown; valid values: '
           f'{", ".join(names)}.')
  if d.schedule == schedules.CUSTOM_SCHEDULE:
    _check_betas_file(d)
  _require(d.objective in schedules.OBJECTIVES,
           f'diffusion.objective={d.objective!r} is unknown; valid values: '
           f'{", ".join(schedules.OBJECTIVES)}.')
  _require(d.timesteps >= 1, f'diffusion.timesteps={d.timesteps} must be >= 1.')
  _require(m.dtype in COMPUTE_DTYPES,
           f'model.dtype={m.dtype!r} is unknown; valid values: {", ".join(COMPUTE_DTYPES)}.')
  impls = ('auto',) + unet.ATTENTION_IMPLS
  _require(m.attention_impl in impls,
           f'model.attention_impl={m.attention_impl!r} is unknown; valid values: '
           f'{", ".join(impls)}.')
  if m.attention_impl == 'cudnn':
    # Asked only here: querying the backend starts it, which must not happen before
    # jax.distributed.initialize on several hosts.
    backend = jax.default_backend()
    _require(m.dtype == 'bfloat16' and backend == 'gpu',
             f'model.attention_impl=\'cudnn\' needs an NVIDIA GPU and model.dtype=bfloat16 '
             f'(here: {backend}, {m.dtype}); use auto or einsum.')
  # Config files written before the key existed (torch import's config.py) mean auto.
  linear_impl = m.get('linear_attention_impl', 'auto')
  linear_impls = ('auto',) + unet.LINEAR_ATTENTION_IMPLS
  _require(linear_impl in linear_impls,
           f'model.linear_attention_impl={linear_impl!r} is unknown; valid '
           f'values: {", ".join(linear_impls)}.')
  if linear_impl == 'triton':
    backend = jax.default_backend()
    _require(backend == 'gpu' and m.dtype in ('bfloat16', 'float32'),
             f'model.linear_attention_impl=\'triton\' needs an NVIDIA GPU and model.dtype '
             f'bfloat16 or float32 (here: {backend}, {m.dtype}); use auto or xla.')
  for key, value in (('train.grid_sampler', config.train.grid_sampler),
                     ('sample.sampler', config.sample.sampler),
                     ('eval.sampler', config.eval.sampler)):
    _require(value in SAMPLERS,
             f'{key}={value!r} is unknown; valid values: {", ".join(SAMPLERS)}.')
  _require(len(m.dim_mults) >= 1, 'model.dim_mults must name at least one level.')
  for mult in m.dim_mults:
    _require((m.dim * mult) % m.resnet_block_groups == 0,
             f'model.dim * model.dim_mults ({m.dim} * {mult}) must be divisible by '
             f'model.resnet_block_groups={m.resnet_block_groups} (GroupNorm groups).')
  # Every level but the innermost halves the image.
  factor = 2 ** (len(m.dim_mults) - 1)
  _require(config.data.image_size % factor == 0,
           f'data.image_size={config.data.image_size} must be divisible by {factor}, '
           f'the U-Net\'s downsampling for model.dim_mults={tuple(m.dim_mults)}; '
           f'e.g. {max(factor, config.data.image_size // factor * factor)}.')


def check_batching(config: ml_collections.ConfigDict, num_devices: int,
                   num_processes: int = 1) -> None:
  """Checks that the global batch splits over devices, hosts and accumulation steps."""
  t = config.train
  _require(t.batch_size >= 1, f'train.batch_size={t.batch_size} must be >= 1.')
  _require(t.grad_accum_steps >= 1,
           f'train.grad_accum_steps={t.grad_accum_steps} must be >= 1.')
  cpu_devices = t.get('cpu_devices', 0)
  _require(cpu_devices >= 0, f'train.cpu_devices={cpu_devices} must be >= 0 (0: one per '
           f'core, 1: a single CPU device).')
  per_step = num_devices * t.grad_accum_steps
  _require(t.batch_size % per_step == 0,
           f'train.batch_size={t.batch_size} must be divisible by the number of devices '
           f'({num_devices}) times train.grad_accum_steps ({t.grad_accum_steps}) = '
           f'{per_step}; e.g. {max(per_step, t.batch_size // per_step * per_step)}.')
  _require(t.batch_size % num_processes == 0,
           f'train.batch_size={t.batch_size} must be divisible by the number of hosts '
           f'({num_processes}).')
  _require(t.num_epochs >= 1, f'train.num_epochs={t.num_epochs} must be >= 1.')
  _require(t.keep_checkpoints >= 1,
           f'train.keep_checkpoints={t.keep_checkpoints} must be >= 1.')
  _require(t.num_grid_samples >= 1,
           f'train.num_grid_samples={t.num_grid_samples} must be >= 1.')


# Per mode: the config keys of its sampler and of that sampler's step count.
_SAMPLER_KEYS = {'train': ('train.grid_sampler', 'train.grid_ddim_steps'),
                 'sample': ('sample.sampler', 'sample.ddim_steps'),
                 'eval': ('eval.sampler', 'eval.steps')}


def check_sampler_steps(config: ml_collections.ConfigDict, mode: str) -> None:
  """Checks that the sampler of `mode` (train, sample, eval) has 1 <= steps <= T."""
  sampler_key, steps_key = _SAMPLER_KEYS[mode]
  sampler, steps = config[sampler_key], config[steps_key]
  timesteps = config.diffusion.timesteps
  _require(sampler == 'ddpm' or 1 <= steps <= timesteps,
           f'{steps_key}={steps} must be in [1, {timesteps}] (diffusion.timesteps) for '
           f'{sampler_key}={sampler!r}.')


def check_eval(config: ml_collections.ConfigDict) -> None:
  """Checks the `eval` group: sample and real-patch counts, batch sizes, FID weights."""
  e = config.eval
  # FID's covariance and KID's unbiased MMD need two images of a set; the real-vs-real
  # floors compare two halves of the reals.
  _require(e.num_samples >= 2, f'eval.num_samples={e.num_samples} must be >= 2.')
  _require(e.num_real >= 4, f'eval.num_real={e.num_real} must be >= 4.')
  for key in ('batch_size', 'inception_batch_size', 'num_grid_samples', 'kid_num_subsets'):
    _require(e[key] >= 1, f'eval.{key}={e[key]} must be >= 1.')
  _require(e.kid_subset_size >= 2, f'eval.kid_subset_size={e.kid_subset_size} must be >= 2.')
  _require(not e.inception_weights or os.path.isfile(e.inception_weights),
           f'eval.inception_weights={e.inception_weights!r} is not a file. Download '
           f'pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth (or convert it to .npz '
           f'with eo_ddpm_jax.inception.convert_fid_inception_weights), or set it to \'\' '
           f'to skip FID and KID.')


def check_data(data_config: ml_collections.ConfigDict) -> None:
  """Checks that the built TFDS dataset exists under data.data_dir."""
  name, _, builder_config = data_config.dataset.partition('/')
  path = os.path.join(data_config.data_dir, name, builder_config)
  _require(os.path.isdir(path),
           f'data.data_dir={data_config.data_dir!r} holds no built dataset '
           f'{data_config.dataset!r} (no folder {path}). Build it with: python -m '
           f'tfds_sen12ms.build --manual_dir=<SEN12MS dir> --data_dir={data_config.data_dir} '
           f'--config={builder_config}')


def check_config(config: ml_collections.ConfigDict, *, num_devices: int,
                 num_processes: int = 1, need_data: bool = True) -> None:
  """All checks; raises ConfigError on the first problem."""
  check_model_and_diffusion(config)
  check_sampler_steps(config, 'train')
  check_batching(config, num_devices, num_processes)
  if need_data:
    check_data(config.data)
