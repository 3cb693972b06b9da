"""Diffusion math over a `Schedule`: forward noising, training loss, posterior, samplers.

Pure jax.numpy functions that mirror denoising-diffusion-pytorch 1.10.12's
`GaussianDiffusion` (q_sample, p_losses, model_predictions, q_posterior, p_mean_variance,
p_sample_loop, ddim_sample). Conventions: images are NHWC floats in [-1, 1]; `t` is an
int32 [B] of library timesteps in [0, T); a denoiser is any `denoise_fn(x_t, t) -> [B,H,W,C]`
whose output is read according to `objective` (noise, x0 or v). Functions compute in the
tables' dtype (float32, or float64 with jax_enable_x64).

Input scaling (Chen 2023), `input_scale` = b: the diffusion runs on z0 = b * x0, i.e.
x_t = sqrt(abar_t) b x0 + sqrt(1 - abar_t) eps, which shifts the data's logSNR by 2 log b
without touching the schedule. Every x_start/x0 below (targets of pred_x0/pred_v, the
model's prediction, the posterior's input) lives in that scaled space; samplers clip it to
[-b, b] and divide the final sample by b, so they return x0 in [-1, 1]. The loss weights
use the schedule's SNR. b = 1 is exactly the library.

Randomness of the samplers: `rng` splits into (init, step) keys; x_T ~ N(0, I) from the
init key and the fresh noise of loop iteration i (0-based, from t = T-1 downwards) from
`fold_in(step_key, i)` (see `_initial_noise`, `_step_noise`). `rng` may also hold one key
per image (uint32 [B, 2], or typed keys [B]): image b's noise then comes from rng[b] alone,
exactly as a run of batch 1 with key rng[b] draws it, so an image does not depend on the
batch it is sampled in (sampling.generate relies on this across batch sizes and devices).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from eo_ddpm_jax.schedules import OBJECTIVES, Schedule, loss_weight

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _extract(table, t, ndim: int):
  """table[t] for t [B], shaped [B, 1, ..., 1] to broadcast against an ndim-d batch."""
  values = jnp.asarray(table)[t]
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _check_objective(objective: str) -> None:
  if objective not in OBJECTIVES:
    raise ValueError(f'unknown objective {objective!r}; valid: {", ".join(OBJECTIVES)}')


def q_sample(schedule: Schedule, x_start, t, noise, input_scale=1.0):
  """Samples q(x_t | x_0): sqrt(abar_t) b x_start + sqrt(1 - abar_t) noise.

  Args:
    x_start: [B, ...] data in [-1, 1] (unscaled). t: int [B] in [0, T).
    noise: standard normal, like x_start.
  Returns:
    x_t, like x_start.
  """
  return (_extract(schedule.sqrt_alphas_cumprod, t, x_start.ndim) * (input_scale * x_start) +
          _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)


def predict_start_from_noise(schedule: Schedule, x_t, t, noise):
  """x0 (scaled) = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps; shapes like x_t."""
  return (_extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t -
          _extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * noise)


def predict_noise_from_start(schedule: Schedule, x_t, t, x0):
  """eps = (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1); shapes like x_t."""
  return ((_extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) /
          _extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def predict_v(schedule: Schedule, x_start, t, noise):
  """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022); shapes like x_start."""
  return (_extract(schedule.sqrt_alphas_cumprod, t, x_start.ndim) * noise -
          _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * x_start)


def predict_start_from_v(schedule: Schedule, x_t, t, v):
  """x0 = sqrt(abar) x_t - sqrt(1 - abar) v; shapes like x_t."""
  return (_extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t -
          _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def q_posterior(schedule: Schedule, x_start, x_t, t):
  """Mean and variance of q(x_{t-1} | x_t, x_0).

  Returns:
    (mean like x_t, variance [B,1,..], log variance clipped at 1e-20 [B,1,..]).
  """
  mean = (_extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x_start +
          _extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
  return (mean, _extract(schedule.posterior_variance, t, x_t.ndim),
          _extract(schedule.posterior_log_variance_clipped, t, x_t.ndim))


def model_predictions(denoise_fn: DenoiseFn, schedule: Schedule, x_t, t, *,
                      objective: str = 'pred_noise', clip_x_start: bool = False,
                      rederive_pred_noise: bool = False, input_scale=1.0):
  """The denoiser's output read as (noise, x0), as the library's model_predictions.

  Args:
    clip_x_start: clip x0 to [-b, b]. rederive_pred_noise: for pred_noise, recompute
      the noise from the clipped x0 (the other objectives always derive it from x0).
  Returns:
    (pred_noise, pred_x_start), each like x_t; x0 in the scaled space.
  """
  _check_objective(objective)
  output = denoise_fn(x_t, t)

  def maybe_clip(x0):
    return jnp.clip(x0, -input_scale, input_scale) if clip_x_start else x0

  if objective == 'pred_noise':
    pred_noise = output
    x_start = maybe_clip(predict_start_from_noise(schedule, x_t, t, pred_noise))
    if clip_x_start and rederive_pred_noise:
      pred_noise = predict_noise_from_start(schedule, x_t, t, x_start)
    return pred_noise, x_start
  if objective == 'pred_x0':
    x_start = maybe_clip(output)
  else:
    x_start = maybe_clip(predict_start_from_v(schedule, x_t, t, output))
  return predict_noise_from_start(schedule, x_t, t, x_start), x_start


def p_mean_variance(denoise_fn: DenoiseFn, schedule: Schedule, x_t, t, *,
                    objective: str = 'pred_noise', clip_denoised: bool = True,
                    input_scale=1.0):
  """Mean and variance of the model's p(x_{t-1} | x_t), x0 clipped to [-b, b] if asked.

  Returns:
    (mean like x_t, variance [B,1,..], log variance [B,1,..], x0 like x_t).
  """
  _, x_start = model_predictions(denoise_fn, schedule, x_t, t, objective=objective,
                                 input_scale=input_scale)
  if clip_denoised:
    x_start = jnp.clip(x_start, -input_scale, input_scale)
  mean, variance, log_variance = q_posterior(schedule, x_start, x_t, t)
  return mean, variance, log_variance, x_start


def training_loss(denoise_fn: DenoiseFn, schedule: Schedule, x_start, rng, *,
                  objective: str = 'pred_noise', min_snr_gamma: float | None = None,
                  offset_noise_strength: float = 0.0, input_scale=1.0, t=None,
                  noise=None, offset_noise=None):
  """The library's p_losses: per-example mean squared error times its weight, batch mean.

  Args:
    x_start: [B, H, W, C] data in [-1, 1].
    rng: key for whatever of t, noise, offset_noise is not given.
    objective: target of the denoiser, one of OBJECTIVES.
    min_snr_gamma: None/0 off, else min-SNR weighting with this gamma (see loss_weight).
    offset_noise_strength: static float; > 0 adds strength * offset_noise, one normal
      value per example and channel, to the noise (the library's offset noise).
    input_scale: b of the input scaling (module docstring).
    t: int [B] in [0, T); uniform if None. noise: like x_start; normal if None.
    offset_noise: [B, 1, 1, C] (any [B, 1.., C]); normal if None.
  Returns:
    Scalar loss in the dtype of the computation.
  """
  _check_objective(objective)
  t_key, noise_key, offset_key = jax.random.split(rng, 3)
  batch = x_start.shape[0]
  if t is None:
    t = jax.random.randint(t_key, (batch,), 0, schedule.betas.shape[0], dtype=jnp.int32)
  if noise is None:
    noise = jax.random.normal(noise_key, x_start.shape, x_start.dtype)
  if offset_noise_strength > 0:
    if offset_noise is None:
      offset_shape = (batch,) + (1,) * (x_start.ndim - 2) + (x_start.shape[-1],)
      offset_noise = jax.random.normal(offset_key, offset_shape, x_start.dtype)
    noise = noise + offset_noise_strength * offset_noise

  x_t = q_sample(schedule, x_start, t, noise, input_scale)
  output = denoise_fn(x_t, t)
  if objective == 'pred_noise':
    target = noise
  elif objective == 'pred_x0':
    target = input_scale * x_start
  else:
    target = predict_v(schedule, input_scale * x_start, t, noise)

  per_example = jnp.mean(jnp.square(output - target), axis=tuple(range(1, x_start.ndim)))
  weight = jnp.asarray(loss_weight(schedule, objective, min_snr_gamma))[t]
  return jnp.mean(per_example * weight)


def p_sample_step(denoise_fn: DenoiseFn, schedule: Schedule, x_t, t, noise, *,
                  objective: str = 'pred_noise', clip_denoised: bool = True,
                  input_scale=1.0):
  """One ancestral step x_t -> x_{t-1} = mean + exp(log_var / 2) noise (no noise at t=0).

  Args:
    x_t: [B, ...]. t: int [B]. noise: standard normal like x_t.
  Returns:
    (x_{t-1}, x0 prediction), each like x_t.
  """
  mean, _, log_variance, x_start = p_mean_variance(
      denoise_fn, schedule, x_t, t, objective=objective, clip_denoised=clip_denoised,
      input_scale=input_scale)
  # The last step (t = 0) returns the posterior mean: its variance is 0.
  nonzero = (t > 0).reshape(t.shape + (1,) * (x_t.ndim - t.ndim))
  noise = jnp.where(nonzero, noise, jnp.zeros_like(noise))
  return mean + jnp.exp(0.5 * log_variance) * noise, x_start


def ddim_timesteps(timesteps: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The library's DDIM time pairs: int(linspace(-1, T-1, S+1)), reversed.

  torch computes that linspace in float32 (its default dtype) with the formula below and
  truncates towards zero; for S not dividing T the float32 rounding decides some
  timesteps, so it is reproduced rather than computed exactly.

  Returns:
    (times, times_next), each int32 [S]: from T-1 downwards; times_next[-1] == -1.
  """
  if not 1 <= num_steps <= timesteps:
    raise ValueError(f'num_steps must be in [1, {timesteps}] (T), got {num_steps}')
  steps = num_steps + 1
  start, end = np.float32(-1), np.float32(timesteps - 1)
  step = np.float32(end - start) / np.float32(steps - 1)
  index = np.arange(steps)
  # torch's linspace kernel: from the start in the first half, from the end in the second.
  from_start = start + step * index.astype(np.float32)
  from_end = end - step * (steps - 1 - index).astype(np.float32)
  times = np.trunc(np.where(index < steps // 2, from_start, from_end)).astype(np.int32)
  times = times[::-1]
  return times[:-1], times[1:]


def ddim_step(denoise_fn: DenoiseFn, schedule: Schedule, x_t, time, time_next, noise, *,
              eta=0.0, objective: str = 'pred_noise', clip_denoised: bool = True,
              input_scale=1.0):
  """One DDIM step (Song et al. 2021) from `time` to `time_next`, as the library's loop.

  The noise is re-derived from the clipped x0; with time_next < 0 the step returns x0.

  Args:
    x_t: [B, ...]. time, time_next: int scalars (time_next may be -1).
    noise: standard normal like x_t. eta: 0 deterministic, 1 DDPM-like.
  Returns:
    (x at time_next, x0 prediction), each like x_t.
  """
  batch_time = jnp.full((x_t.shape[0],), time, dtype=jnp.int32)
  pred_noise, x_start = model_predictions(
      denoise_fn, schedule, x_t, batch_time, objective=objective,
      clip_x_start=clip_denoised, rederive_pred_noise=True, input_scale=input_scale)
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod)
  alpha = alphas_cumprod[time]
  alpha_next = alphas_cumprod[jnp.maximum(time_next, 0)]
  sigma = eta * jnp.sqrt((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha))
  c = jnp.sqrt(1 - alpha_next - sigma ** 2)
  x_next = x_start * jnp.sqrt(alpha_next) + c * pred_noise + sigma * noise
  return jnp.where(time_next < 0, x_start, x_next), x_start


def _per_key(draw, rng, shape):
  """draw(key, shape), or per image draw(rng[b], shape[1:]) when rng holds B keys."""
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if rng.ndim == (0 if typed else 1):
    return draw(rng, shape)
  if rng.shape[0] != shape[0]:
    raise ValueError(f'{rng.shape[0]} per-image keys for a batch of {shape[0]} images')
  # A draw of shape [1, ...] and of [...] give the same values, so image b equals a
  # batch-1 run with key rng[b].
  return jax.vmap(lambda key: draw(key, shape[1:]))(rng)


def _initial_noise(rng, shape, dtype):
  """x_T of a sampler run with key rng (or one key per image)."""
  def draw(key, key_shape):
    init_key, _ = jax.random.split(key)
    return jax.random.normal(init_key, key_shape, dtype)
  return _per_key(draw, jnp.asarray(rng), shape)


def _step_noise(rng, i, shape, dtype):
  """The fresh noise of loop iteration i (0-based) of a sampler run with key rng."""
  def draw(key, key_shape):
    _, step_key = jax.random.split(key)
    return jax.random.normal(jax.random.fold_in(step_key, i), key_shape, dtype)
  return _per_key(draw, jnp.asarray(rng), shape)


def ddpm_sample(denoise_fn: DenoiseFn, schedule: Schedule, shape, rng, *,
                objective: str = 'pred_noise', input_scale=1.0, clip_denoised: bool = True):
  """Ancestral sampling over all T steps (the library's p_sample_loop), one fori_loop.

  Args:
    schedule: the tables; their dtype is the sampling dtype.
    shape: static (B, H, W, C).
  Returns:
    x0 samples [B, H, W, C], in [-1, 1] when clip_denoised.
  """
  _check_objective(objective)
  num_timesteps = schedule.betas.shape[0]
  dtype = jnp.asarray(schedule.betas).dtype

  def body(i, x):
    t = jnp.full((shape[0],), num_timesteps - 1 - i, dtype=jnp.int32)
    x, _ = p_sample_step(denoise_fn, schedule, x, t, _step_noise(rng, i, shape, dtype),
                         objective=objective, clip_denoised=clip_denoised,
                         input_scale=input_scale)
    return x

  x = jax.lax.fori_loop(0, num_timesteps, body, _initial_noise(rng, shape, dtype))
  return x / input_scale


def ddim_sample(denoise_fn: DenoiseFn, schedule: Schedule, shape, rng, *, num_steps: int,
                eta=0.0, objective: str = 'pred_noise', input_scale=1.0,
                clip_denoised: bool = True):
  """DDIM sampling in num_steps steps (the library's ddim_sample), one lax.scan.

  Args:
    shape: static (B, H, W, C). num_steps: static S in [1, T]. eta: >= 0.
  Returns:
    x0 samples [B, H, W, C], in [-1, 1] when clip_denoised.
  """
  _check_objective(objective)
  dtype = jnp.asarray(schedule.betas).dtype
  times, times_next = ddim_timesteps(schedule.betas.shape[0], num_steps)

  def body(x, step):
    i, time, time_next = step
    x, _ = ddim_step(denoise_fn, schedule, x, time, time_next,
                     _step_noise(rng, i, shape, dtype), eta=eta, objective=objective,
                     clip_denoised=clip_denoised, input_scale=input_scale)
    return x, None

  steps = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(times), jnp.asarray(times_next))
  x, _ = jax.lax.scan(body, _initial_noise(rng, shape, dtype), steps)
  return x / input_scale
