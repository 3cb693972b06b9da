"""Noise schedules: named beta schedules and every table the diffusion derives from them.

Everything here is float64 numpy and follows denoising-diffusion-pytorch 1.10.12
(`linear_beta_schedule`, `cosine_beta_schedule`, `sigmoid_beta_schedule` and the buffers
of `GaussianDiffusion.__init__`), operation for operation, so that the tables equal the
library's float64 values to rounding. A `Schedule` is a NamedTuple, hence a JAX pytree:
pass it as an argument of jitted functions and gather from its tables by timestep there.
Cast it once with `schedule_as` (e.g. to float32 device arrays) before training.
"""

import math
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

OBJECTIVES = ('pred_noise', 'pred_x0', 'pred_v')

# Betas are clipped below 1 so that no single step erases the signal completely
# (the cosine and sigmoid schedules reach alpha_cumprod = 0 at t = T).
MAX_BETA = 0.999
# The posterior variance is 0 at t = 0; its log is taken of at least this.
POSTERIOR_VARIANCE_FLOOR = 1e-20


class Schedule(NamedTuple):
  """All per-timestep tables of a diffusion with T steps; each field has shape [T].

  Index t in [0, T) is the library's t, i.e. the paper's step t + 1.
  """
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  log_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  snr: np.ndarray  # alphas_cumprod / (1 - alphas_cumprod)

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def linear_beta_schedule(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                         reference_timesteps: int = 1000) -> np.ndarray:
  """Ho et al. (2020): betas evenly spaced, rescaled so any T matches T = 1000's noise.

  Returns:
    float64 [timesteps], betas in (0, 1).
  """
  scale = reference_timesteps / timesteps
  return np.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=np.float64)


def _betas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
  """[T + 1] cumulative alphas at t/T, t = 0..T -> [T] betas clipped to [0, MAX_BETA]."""
  betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
  return np.clip(betas, 0, MAX_BETA)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> np.ndarray:
  """Nichol & Dhariwal (2021): alpha_cumprod(t) = cos((t/T + s) / (1 + s) * pi/2)^2.

  Returns:
    float64 [timesteps], betas in [0, MAX_BETA].
  """
  t = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64) / timesteps
  # Same operation order as the library, so the rounding is the same.
  alphas_cumprod = np.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2
  alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
  return _betas_from_alphas_cumprod(alphas_cumprod)


def _torch_float32_sigmoid(x: float) -> np.float64:
  """sigmoid(x) rounded as torch computes it on a float32 scalar: 1 / (1 + expf(-x)).

  exp is evaluated in float64 and rounded to float32, which equals a faithful expf in
  all but rare double-rounding cases (none at the schedule's default end points).
  """
  x32 = np.float32(x)
  exp32 = np.float32(math.exp(-float(x32)))
  return np.float32(np.float32(1) / (np.float32(1) + exp32))


def sigmoid_beta_schedule(timesteps: int, start: float = -3., end: float = 3.,
                          tau: float = 1.) -> np.ndarray:
  """Chen (2023) / Jabri et al. (RIN): alpha_cumprod from a sigmoid over [start, end] / tau.

  alpha_cumprod(t) = (sig(end/tau) - sig((t/T (end - start) + start)/tau))
                     / (sig(end/tau) - sig(start/tau)), normalised by its value at t = 0.

  Returns:
    float64 [timesteps], betas in [0, MAX_BETA].
  """
  t = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64) / timesteps
  # The library builds the two end constants with `torch.tensor(start / tau).sigmoid()`,
  # i.e. in float32 (torch's default dtype), and the rest in float64; the float32
  # rounding shifts alphas_cumprod by up to ~3e-5 relative, so reproduce it. Their
  # difference is also taken in float32 there (two float32 scalars).
  v_start = _torch_float32_sigmoid(start / tau)
  v_end = _torch_float32_sigmoid(end / tau)
  denominator = np.float64(np.float32(v_end - v_start))
  sig = 1 / (1 + np.exp(-((t * (end - start) + start) / tau)))
  alphas_cumprod = (-sig + np.float64(v_end)) / denominator
  alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
  return _betas_from_alphas_cumprod(alphas_cumprod)


SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    'linear': linear_beta_schedule,
    'cosine': cosine_beta_schedule,
    'sigmoid': sigmoid_beta_schedule,
}
# A schedule given by its betas instead of a name (e.g. an imported run's): configs name
# a .npy file of them and `schedule_from_betas` derives the tables.
CUSTOM_SCHEDULE = 'custom'


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  """Derives every table from betas, in float64, as GaussianDiffusion.__init__ does.

  Args:
    betas: [T], each in (0, 1).
  Returns:
    A float64 numpy `Schedule`.
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f'betas must be a non-empty 1-D array, got shape {betas.shape}')
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError('every beta must lie in (0, 1); got min '
                     f'{betas.min()} and max {betas.max()}')
  alphas = 1. - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.concatenate([[1.], alphas_cumprod[:-1]])
  posterior_variance = betas * (1. - alphas_cumprod_prev) / (1. - alphas_cumprod)
  return Schedule(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1. - alphas_cumprod),
      log_one_minus_alphas_cumprod=np.log(1. - alphas_cumprod),
      sqrt_recip_alphas_cumprod=np.sqrt(1. / alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1. / alphas_cumprod - 1),
      posterior_variance=posterior_variance,
      # Clipped because the posterior variance is 0 at t = 0.
      posterior_log_variance_clipped=np.log(
          np.maximum(posterior_variance, POSTERIOR_VARIANCE_FLOOR)),
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1. - alphas_cumprod),
      posterior_mean_coef2=(1. - alphas_cumprod_prev) * np.sqrt(alphas) / (1. - alphas_cumprod),
      snr=alphas_cumprod / (1 - alphas_cumprod),
  )


def make_schedule(name: str, timesteps: int, **params) -> Schedule:
  """The named schedule ('linear', 'cosine', 'sigmoid') with T = timesteps, float64.

  Args:
    name: a key of SCHEDULES.
    timesteps: T >= 1.
    **params: the schedule's own parameters (cosine: s; sigmoid: start, end, tau).
  Raises:
    ValueError: unknown name or bad timesteps/parameters; the message lists valid ones.
  """
  if name not in SCHEDULES:
    raise ValueError(f'unknown beta schedule {name!r}; valid names: {", ".join(SCHEDULES)}')
  if int(timesteps) != timesteps or timesteps < 1:
    raise ValueError(f'timesteps must be a positive integer, got {timesteps!r}')
  try:
    betas = SCHEDULES[name](int(timesteps), **params)
  except TypeError as e:
    raise ValueError(f'bad parameters {params} for the {name!r} schedule: {e}') from e
  return schedule_from_betas(betas)


def schedule_as(schedule: Schedule, dtype=jnp.float32) -> Schedule:
  """Every table as a jax array of `dtype` (float64 needs jax_enable_x64)."""
  return Schedule(*(jnp.asarray(field, dtype=dtype) for field in schedule))


def loss_weight(schedule: Schedule, objective: str,
                min_snr_gamma: float | None = None):
  """Per-timestep loss weight of GaussianDiffusion for an objective.

  pred_noise: 1; pred_x0: snr; pred_v: snr / (snr + 1) -- each makes the loss equal to
  the noise-prediction loss. With min-SNR weighting (Hang et al. 2023) the snr in the
  numerator is clipped at gamma. Works on numpy or jax tables (inside jit too).

  Args:
    schedule: numpy or jax `Schedule`.
    objective: one of OBJECTIVES.
    min_snr_gamma: None or 0 turns min-SNR weighting off; otherwise gamma > 0.
  Returns:
    [T] weights, in the tables' dtype.
  """
  snr = schedule.snr
  if min_snr_gamma is not None and min_snr_gamma < 0:
    raise ValueError(f'min_snr_gamma must be None, 0 (off) or positive, got {min_snr_gamma}')
  clipped_snr = snr.clip(max=min_snr_gamma) if min_snr_gamma else snr
  if objective == 'pred_noise':
    return clipped_snr / snr
  if objective == 'pred_x0':
    return clipped_snr
  if objective == 'pred_v':
    return clipped_snr / (snr + 1)
  raise ValueError(f'unknown objective {objective!r}; valid: {", ".join(OBJECTIVES)}')
