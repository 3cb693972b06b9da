"""Tests of eo_ddpm_jax.diffusion: the PyTorch library on fixed inputs, and closed forms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eo_ddpm_jax import diffusion, schedules
from tests.test_schedules import library_diffusion_float64, make_stub_model

# Relative tolerance of float64 results against the library's float64 results.
RTOL = 1e-10


@pytest.fixture(scope='module')
def torch():
  return pytest.importorskip('torch', reason='needs the [torch] extra: pip install -e .[torch]')


# A fixed nonlinear function of (x, t), elementwise so it is the same in NHWC and NCHW.
def stub_jax(x, t):
  t = t.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.7 * jnp.tanh(x) + 0.3 * x * jnp.cos(0.013 * t) + 0.05 * jnp.sin(0.0031 * t + x)


def stub_torch(x, t):
  import torch  # pylint: disable=g-import-not-at-top
  t = t.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.7 * torch.tanh(x) + 0.3 * x * torch.cos(0.013 * t) + 0.05 * torch.sin(0.0031 * t + x)


def to_torch(a):
  """NHWC numpy/jax -> NCHW float64 torch tensor (ints stay ints)."""
  import torch  # pylint: disable=g-import-not-at-top
  a = np.asarray(a)
  if a.ndim == 4:
    a = np.transpose(a, (0, 3, 1, 2))
  return torch.from_numpy(np.ascontiguousarray(a))


def from_torch(x):
  """NCHW torch tensor (or [B,1,1,1]) -> NHWC numpy."""
  a = x.detach().numpy()
  return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def library(torch, objective='pred_noise', name='sigmoid', timesteps=500, **kwargs):
  model = make_stub_model(torch, 3, stub_torch)
  return library_diffusion_float64(name, timesteps, model=model, objective=objective, **kwargs)


def fixed_inputs(shape=(4, 6, 6, 3), seed=0):
  rng = np.random.default_rng(seed)
  x_start = np.clip(rng.normal(0.1, 0.5, shape), -1, 1)
  noise = rng.normal(size=shape)
  x_t = rng.normal(size=shape)
  return x_start, noise, x_t


def assert_close(ours, theirs_torch):
  np.testing.assert_allclose(np.asarray(ours), from_torch(theirs_torch), rtol=RTOL, atol=1e-13)


# ----------------------------------------------------------------------------------------
# Against the library, float64, fixed inputs.

def test_forward_process_and_parametrisations_equal_library(x64, torch):
  reference = library(torch)
  schedule = schedules.make_schedule('sigmoid', 500)
  x_start, noise, x_t = fixed_inputs()
  t = np.array([0, 1, 250, 499])
  tt = torch.from_numpy(t)
  assert_close(diffusion.q_sample(schedule, x_start, t, noise),
               reference.q_sample(to_torch(x_start), tt, to_torch(noise)))
  assert_close(diffusion.predict_start_from_noise(schedule, x_t, t, noise),
               reference.predict_start_from_noise(to_torch(x_t), tt, to_torch(noise)))
  assert_close(diffusion.predict_noise_from_start(schedule, x_t, t, x_start),
               reference.predict_noise_from_start(to_torch(x_t), tt, to_torch(x_start)))
  assert_close(diffusion.predict_v(schedule, x_start, t, noise),
               reference.predict_v(to_torch(x_start), tt, to_torch(noise)))
  assert_close(diffusion.predict_start_from_v(schedule, x_t, t, noise),
               reference.predict_start_from_v(to_torch(x_t), tt, to_torch(noise)))
  ours = diffusion.q_posterior(schedule, x_start, x_t, t)
  theirs = reference.q_posterior(to_torch(x_start), to_torch(x_t), tt)
  for a, b in zip(ours, theirs):
    assert_close(a, b)


@pytest.mark.parametrize('objective', schedules.OBJECTIVES)
def test_model_predictions_and_p_mean_variance_equal_library(x64, torch, objective):
  reference = library(torch, objective)
  schedule = schedules.make_schedule('sigmoid', 500)
  _, _, x_t = fixed_inputs()
  x_t = 3 * x_t  # Far out, so that clipping x0 to [-1, 1] matters.
  t = np.array([3, 100, 300, 499])
  tt = torch.from_numpy(t)
  for clip in (False, True):
    ours = diffusion.model_predictions(stub_jax, schedule, x_t, t, objective=objective,
                                       clip_x_start=clip, rederive_pred_noise=clip)
    theirs = reference.model_predictions(to_torch(x_t), tt, clip_x_start=clip,
                                         rederive_pred_noise=clip)
    for a, b in zip(ours, theirs):
      assert_close(a, b)
    ours = diffusion.p_mean_variance(stub_jax, schedule, x_t, t, objective=objective,
                                     clip_denoised=clip)
    theirs = reference.p_mean_variance(to_torch(x_t), tt, clip_denoised=clip)
    for a, b in zip(ours, theirs):
      assert_close(a, b)
    if clip:
      assert np.abs(ours[3]).max() == 1.0  # Clipping was active.


@pytest.mark.parametrize('offset', [0.0, 0.1])
@pytest.mark.parametrize('gamma', [None, 5.0])
@pytest.mark.parametrize('objective', schedules.OBJECTIVES)
def test_training_loss_equals_library(x64, torch, monkeypatch, objective, gamma, offset):
  reference = library(torch, objective, min_snr_loss_weight=gamma is not None,
                      offset_noise_strength=offset,
                      **({} if gamma is None else {'min_snr_gamma': gamma}))
  schedule = schedules.make_schedule('sigmoid', 500)
  x_start, noise, _ = fixed_inputs()
  t = np.array([0, 7, 260, 499])
  offset_noise = np.random.default_rng(1).normal(size=(4, 3))
  # The library draws the offset noise with torch.randn(b, c); hand it ours instead.
  monkeypatch.setattr(torch, 'randn', lambda *a, **k: torch.from_numpy(offset_noise.copy()))
  theirs = reference.p_losses(to_torch(x_start), torch.from_numpy(t),
                              noise=to_torch(noise).clone()).item()
  ours = diffusion.training_loss(
      stub_jax, schedule, x_start, jax.random.key(0), objective=objective,
      min_snr_gamma=gamma, offset_noise_strength=offset, t=t, noise=noise,
      offset_noise=offset_noise[:, None, None, :])
  assert ours.dtype == jnp.float64
  np.testing.assert_allclose(float(ours), theirs, rtol=RTOL)


@pytest.mark.parametrize('objective', schedules.OBJECTIVES)
def test_p_sample_step_equals_library(x64, torch, monkeypatch, objective):
  reference = library(torch, objective)
  schedule = schedules.make_schedule('sigmoid', 500)
  _, noise, x_t = fixed_inputs()
  monkeypatch.setattr(torch, 'randn_like', lambda x: to_torch(noise))
  for step in (0, 1, 123, 499):
    t = np.full((4,), step)
    ours = diffusion.p_sample_step(stub_jax, schedule, x_t, t, noise, objective=objective)
    theirs = reference.p_sample(to_torch(x_t), step)
    for a, b in zip(ours, theirs):
      assert_close(a, b)


def _library_noise_queue(torch, monkeypatch, rng, shape, num_steps):
  """Makes torch.randn / randn_like return our sampler's noises, in order."""
  queue = [diffusion._initial_noise(rng, shape, jnp.float64)]
  queue += [diffusion._step_noise(rng, i, shape, jnp.float64) for i in range(num_steps)]
  queue = [to_torch(a) for a in queue]
  monkeypatch.setattr(torch, 'randn', lambda *a, **k: queue.pop(0))
  monkeypatch.setattr(torch, 'randn_like', lambda x: queue.pop(0))
  return queue


@pytest.mark.parametrize('objective', ['pred_noise', 'pred_v'])  # pred_x0: step test.
def test_ddpm_sampler_equals_library_loop(x64, torch, monkeypatch, objective):
  timesteps, shape, rng = 20, (2, 4, 4, 3), jax.random.key(3)
  reference = library(torch, objective, timesteps=timesteps)
  queue = _library_noise_queue(torch, monkeypatch, rng, shape, timesteps - 1)
  theirs = reference.p_sample_loop((2, 3, 4, 4))
  assert not queue  # It drew x_T and one noise per step but the last.
  schedule = schedules.make_schedule('sigmoid', timesteps)
  ours = jax.jit(functools.partial(diffusion.ddpm_sample, stub_jax, objective=objective),
                 static_argnames=('shape',))(schedule, shape, rng)
  assert_close(ours, theirs)


@pytest.mark.parametrize('num_steps,eta,objective', [
    (10, 0.0, 'pred_noise'), (7, 1.0, 'pred_x0'), (13, 0.5, 'pred_v')])
def test_ddim_sampler_equals_library_loop(x64, torch, monkeypatch, num_steps, eta, objective):
  timesteps, shape, rng = 50, (2, 4, 4, 3), jax.random.key(4)
  reference = library(torch, objective, name='cosine', timesteps=timesteps,
                      sampling_timesteps=num_steps, ddim_sampling_eta=eta)
  queue = _library_noise_queue(torch, monkeypatch, rng, shape, num_steps - 1)
  theirs = reference.ddim_sample((2, 3, 4, 4))
  assert not queue
  schedule = schedules.make_schedule('cosine', timesteps)
  ours = diffusion.ddim_sample(stub_jax, schedule, shape, rng, num_steps=num_steps, eta=eta,
                               objective=objective)
  assert_close(ours, theirs)


def test_ddim_timesteps_equal_library_linspace(torch):
  for timesteps in (50, 500, 1000):
    for num_steps in list(range(1, 60)) + [99, 100, 250, 333, timesteps]:
      if num_steps > timesteps:
        continue
      expected = torch.linspace(-1, timesteps - 1, steps=num_steps + 1).int().tolist()[::-1]
      times, times_next = diffusion.ddim_timesteps(timesteps, num_steps)
      assert times.tolist() == expected[:-1] and times_next.tolist() == expected[1:]


def test_ddim_with_eta_one_and_all_steps_is_ddpm(x64):
  # sigma^2 = posterior variance and the DDIM mean is the posterior mean: the same chain.
  schedule = schedules.make_schedule('cosine', 30)
  shape, rng = (3, 5, 5, 2), jax.random.key(5)
  fn = lambda x, t: 2.0 * stub_jax(x, t)  # Large enough that clipping is active.
  ddpm = diffusion.ddpm_sample(fn, schedule, shape, rng)
  ddim = diffusion.ddim_sample(fn, schedule, shape, rng, num_steps=30, eta=1.0)
  np.testing.assert_allclose(ddim, ddpm, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Input scaling, loss formula and jit use.

def test_training_loss_formula_and_input_scaling(x64):
  schedule = schedules.make_schedule('cosine', 100)
  x_start, noise, _ = fixed_inputs(seed=2)
  t = np.array([0, 10, 50, 99])
  b = 0.6
  sqrt_abar = schedule.sqrt_alphas_cumprod[t][:, None, None, None]
  sqrt_one_minus = schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
  x_t = sqrt_abar * b * x_start + sqrt_one_minus * noise
  np.testing.assert_allclose(diffusion.q_sample(schedule, x_start, t, noise, b), x_t, rtol=1e-14)
  targets = {'pred_noise': noise, 'pred_x0': b * x_start,
             'pred_v': sqrt_abar * noise - sqrt_one_minus * b * x_start}
  for objective, target in targets.items():
    for gamma in (None, 2.0):
      loss = lambda fn: float(diffusion.training_loss(
          fn, schedule, x_start, jax.random.key(0), objective=objective,
          min_snr_gamma=gamma, input_scale=b, t=t, noise=noise))
      # The exact target costs nothing; the zero output costs the weighted mean square.
      assert loss(lambda x, tt: jnp.asarray(target)) == pytest.approx(0, abs=1e-25)
      weight = schedules.loss_weight(schedule, objective, gamma)[t]
      expected = np.mean(np.mean(target ** 2, axis=(1, 2, 3)) * weight)
      assert loss(lambda x, tt: jnp.zeros_like(x)) == pytest.approx(expected, rel=1e-12)


def test_clipping_follows_input_scale(x64):
  schedule = schedules.make_schedule('linear', 100)
  _, _, x_t = fixed_inputs()
  t = np.array([99, 99, 99, 99])
  huge = lambda x, tt: -100 * x  # Predicts x0 far outside [-1, 1].
  for b in (1.0, 0.5):
    *_, x_start = diffusion.p_mean_variance(huge, schedule, x_t, t, input_scale=b)
    assert np.abs(x_start).max() == b
    _, x_start = diffusion.model_predictions(huge, schedule, x_t, t, clip_x_start=True,
                                             input_scale=b)
    assert np.abs(x_start).max() == b
  samples = diffusion.ddim_sample(huge, schedule, (4, 2, 2, 1), jax.random.key(0),
                                  num_steps=5, input_scale=0.5)
  assert np.abs(samples).max() == 1.0  # Clipped to [-b, b], then divided by b.


def test_training_loss_samples_t_and_noise_from_rng():
  schedule = schedules.schedule_as(schedules.make_schedule('sigmoid', 500), jnp.float32)
  x_start = jnp.zeros((512, 1, 1, 1))
  seen_t = []

  def fn(x, t):
    seen_t.append(np.asarray(t))
    return jnp.zeros_like(x)

  loss = diffusion.training_loss(fn, schedule, x_start, jax.random.key(7))
  assert loss.dtype == jnp.float32
  # Zero output, pred_noise: the loss is the mean square of the drawn noise, ~1.
  assert float(loss) == pytest.approx(1.0, abs=NUM_SIGMAS * np.sqrt(2 / 512))
  t = seen_t[0]
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 499 and len(np.unique(t)) > 300
  zero_fn = lambda x, t: jnp.zeros_like(x)
  jitted = jax.jit(functools.partial(diffusion.training_loss, zero_fn))
  assert float(jitted(schedule, x_start, jax.random.key(7))) == pytest.approx(float(loss))
  assert float(jitted(schedule, x_start, jax.random.key(8))) != float(loss)


def test_unknown_objective_is_an_error():
  schedule = schedules.make_schedule('linear', 100)
  with pytest.raises(ValueError, match='pred_noise, pred_x0, pred_v'):
    diffusion.training_loss(stub_jax, schedule, jnp.zeros((1, 2, 2, 1)), jax.random.key(0),
                            objective='pred_eps')
  with pytest.raises(ValueError, match='num_steps'):
    diffusion.ddim_timesteps(100, 101)


# ----------------------------------------------------------------------------------------
# Closed form: Gaussian data N(mu, s^2) per channel has the optimal noise predictor
# eps*(x_t, t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), and with it
# every sampler is a linear-Gaussian chain whose output moments follow a scalar recursion.
# The samplers must match the recursion within the sampling error of NUM_SAMPLES draws;
# the recursion itself quantifies how far the discrete chain is from the data moments
# (DDPM's posterior variance ignores the uncertainty of x0, so it is a little narrow).

NUM_SAMPLES = 32768
SHAPE = (NUM_SAMPLES, 1, 1, 2)
DATA_MEAN = np.array([0.2, -0.3])
DATA_STD = np.array([0.5, 0.35])
NUM_SIGMAS = 5  # Tolerance in standard errors of the sample mean and variance.


def _optimal_noise_fn(schedule, mean, var):
  def eps(x, t):
    abar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mean) / (abar * var + 1 - abar)
  return eps


@functools.partial(jax.jit, static_argnames=('clip',))
def _ddpm_gaussian(schedule, rng, mean, std, input_scale, clip=False):
  fn = _optimal_noise_fn(schedule, input_scale * mean, (input_scale * std) ** 2)
  return diffusion.ddpm_sample(fn, schedule, SHAPE, rng, input_scale=input_scale,
                               clip_denoised=clip)


@functools.partial(jax.jit, static_argnames=('num_steps', 'clip'))
def _ddim_gaussian(schedule, rng, mean, std, eta, num_steps, clip=False):
  fn = _optimal_noise_fn(schedule, mean, std ** 2)
  return diffusion.ddim_sample(fn, schedule, SHAPE, rng, num_steps=num_steps, eta=eta,
                               clip_denoised=clip)


def _posterior_x0_gain(abar, mean, var):
  """E[x0 | x_t] = k x_t + d for Gaussian data."""
  k = np.sqrt(abar) * var / (abar * var + 1 - abar)
  return k, mean * (1 - k * np.sqrt(abar))


def ddpm_moments(schedule, mean, var):
  """Mean and variance of the ancestral chain's output, from x_T ~ N(0, 1)."""
  m, v = np.zeros_like(mean), np.ones_like(var)
  for t in range(schedule.num_timesteps - 1, -1, -1):
    k, d = _posterior_x0_gain(schedule.alphas_cumprod[t], mean, var)
    c1, c2 = schedule.posterior_mean_coef1[t], schedule.posterior_mean_coef2[t]
    m, v = (c1 * k + c2) * m + c1 * d, (c1 * k + c2) ** 2 * v
    if t > 0:
      v = v + schedule.posterior_variance[t]
  return m, v


def ddim_moments(schedule, mean, var, num_steps, eta):
  """Mean and variance of the DDIM chain's output, from x_T ~ N(0, 1)."""
  m, v = np.zeros_like(mean), np.ones_like(var)
  times, times_next = diffusion.ddim_timesteps(schedule.num_timesteps, num_steps)
  for time, time_next in zip(times, times_next):
    a = schedule.alphas_cumprod[time]
    k, d = _posterior_x0_gain(a, mean, var)
    if time_next < 0:
      return k * m + d, k ** 2 * v
    a_next = schedule.alphas_cumprod[time_next]
    sigma = eta * np.sqrt((1 - a / a_next) * (1 - a_next) / (1 - a))
    c = np.sqrt(1 - a_next - sigma ** 2)
    # x_next = sqrt(a_next) x0 + c eps + sigma z, eps = (x - sqrt(a) x0) / sqrt(1 - a).
    gain = np.sqrt(a_next) * k + c * (1 - np.sqrt(a) * k) / np.sqrt(1 - a)
    shift = np.sqrt(a_next) * d - c * np.sqrt(a) * d / np.sqrt(1 - a)
    m, v = gain * m + shift, gain ** 2 * v + sigma ** 2
  raise AssertionError('the DDIM times must end at -1')


def assert_moments(samples, chain_mean, chain_var, data_mean, data_var, max_chain_bias):
  x = np.asarray(samples, np.float64).reshape(-1, samples.shape[-1])
  n = x.shape[0]
  np.testing.assert_array_less(np.abs(x.mean(0) - chain_mean),
                               NUM_SIGMAS * np.sqrt(chain_var / n))
  np.testing.assert_array_less(np.abs(x.var(0) / chain_var - 1), NUM_SIGMAS * np.sqrt(2 / n))
  # The chain keeps the data mean and nearly the data variance.
  np.testing.assert_allclose(chain_mean, data_mean, atol=1e-3)
  np.testing.assert_array_less(np.abs(chain_var / data_var - 1), max_chain_bias)
  # And so do the samples, within sampling error plus that bias.
  np.testing.assert_array_less(
      np.abs(x.var(0) / data_var - 1), max_chain_bias + NUM_SIGMAS * np.sqrt(2 / n))


@pytest.mark.parametrize('name', ['linear', 'cosine', 'sigmoid'])
def test_ddpm_reproduces_gaussian_data(name):
  schedule = schedules.make_schedule(name, 500)
  samples = _ddpm_gaussian(schedules.schedule_as(schedule), jax.random.key(10),
                           DATA_MEAN, DATA_STD, 1.0)
  chain_mean, chain_var = ddpm_moments(schedule, DATA_MEAN, DATA_STD ** 2)
  assert_moments(samples, chain_mean, chain_var, DATA_MEAN, DATA_STD ** 2, max_chain_bias=0.05)


def test_ddpm_with_input_scaling_reproduces_gaussian_data():
  b = 0.5
  schedule = schedules.make_schedule('sigmoid', 500)
  samples = _ddpm_gaussian(schedules.schedule_as(schedule), jax.random.key(11),
                           DATA_MEAN, DATA_STD, b)
  # The chain runs on b x0; the output is divided by b.
  chain_mean, chain_var = ddpm_moments(schedule, b * DATA_MEAN, (b * DATA_STD) ** 2)
  assert_moments(samples, chain_mean / b, chain_var / b ** 2, DATA_MEAN, DATA_STD ** 2,
                 max_chain_bias=0.08)


@pytest.mark.parametrize('eta', [0.0, 1.0])
@pytest.mark.parametrize('name', ['linear', 'cosine', 'sigmoid'])
def test_ddim_reproduces_gaussian_data(name, eta):
  num_steps = 250
  schedule = schedules.make_schedule(name, 500)
  samples = _ddim_gaussian(schedules.schedule_as(schedule), jax.random.key(12), DATA_MEAN,
                           DATA_STD, eta, num_steps)
  chain_mean, chain_var = ddim_moments(schedule, DATA_MEAN, DATA_STD ** 2, num_steps, eta)
  assert_moments(samples, chain_mean, chain_var, DATA_MEAN, DATA_STD ** 2, max_chain_bias=0.08)


def test_ddim_with_clipping_reproduces_narrow_gaussian_data():
  # Data 6 standard deviations inside [-1, 1]: the default clipping must not bias it.
  mean, std, num_steps = np.array([0.1, -0.2]), np.array([0.15, 0.12]), 100
  schedule = schedules.make_schedule('cosine', 500)
  samples = _ddim_gaussian(schedules.schedule_as(schedule), jax.random.key(13), mean, std,
                           0.0, num_steps, clip=True)
  chain_mean, chain_var = ddim_moments(schedule, mean, std ** 2, num_steps, 0.0)
  assert_moments(samples, chain_mean, chain_var, mean, std ** 2, max_chain_bias=0.25)
