"""Tests of eo_ddpm_jax.dpm_solver: one step against NumPy, DDIM equivalence, Gaussian data."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eo_ddpm_jax import diffusion, dpm_solver, schedules
from tests.test_diffusion import (DATA_MEAN, DATA_STD, NUM_SIGMAS, SHAPE, _optimal_noise_fn,
                                  _posterior_x0_gain, stub_jax)


def numpy_lambda(abar):
  return 0.5 * np.log(abar / (1 - abar))


def test_timesteps_are_distinct_and_uniform_in_log_snr(x64):
  for name in ('linear', 'cosine', 'sigmoid'):
    schedule = schedules.make_schedule(name, 500)
    for num_steps in (1, 2, 5, 20, 25, 100):
      times, times_next = map(np.asarray, dpm_solver.dpm_solver_timesteps(
          schedule.alphas_cumprod, num_steps))
      assert len(times) == num_steps and times[0] == 499 and times_next[-1] == -1
      assert times[-1] == (0 if num_steps > 1 else 499)
      np.testing.assert_array_equal(times_next[:-1], times[1:])
      assert np.all(np.diff(times) < 0)
    # Away from the clamped noisy end, each time is the lambda-nearest to a uniform grid.
    lambdas = numpy_lambda(schedule.alphas_cumprod)
    times, _ = dpm_solver.dpm_solver_timesteps(schedule.alphas_cumprod, 20)
    targets = np.linspace(lambdas[-1], lambdas[0], 20)
    nearest = np.abs(lambdas[None, :] - targets[:, None]).argmin(1)
    np.testing.assert_array_equal(np.asarray(times)[-10:], nearest[-10:])
  with pytest.raises(ValueError, match='num_steps'):
    dpm_solver.dpm_solver_timesteps(schedule.alphas_cumprod, 501)


def test_second_order_step_equals_numpy_formula(x64):
  schedule = schedules.make_schedule('cosine', 100)
  rng = np.random.default_rng(0)
  x, x0, x0_prev = rng.normal(size=(3, 2, 4, 4, 3))
  abar = schedule.alphas_cumprod
  prev, s, t = 80, 60, 45
  lam = numpy_lambda(abar)
  h, h_prev = lam[t] - lam[s], lam[s] - lam[prev]
  r = h_prev / h
  # Lu et al. 2022, Alg. 2 (2M), written from abar.
  d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
  expected = (np.sqrt((1 - abar[t]) / (1 - abar[s])) * x -
              np.sqrt(abar[t]) * (np.exp(-h) - 1) * d)
  ours, ours_h = dpm_solver.dpm_solver_2m_step(schedule, x, s, t, x0, x0_prev, h_prev,
                                               first_order=False)
  np.testing.assert_allclose(ours, expected, rtol=1e-12)
  assert float(ours_h) == pytest.approx(h, rel=1e-12)
  # First order is DDIM (eta = 0): sqrt(abar_t) x0 + sqrt(1 - abar_t) eps(x, x0).
  eps = (x - np.sqrt(abar[s]) * x0) / np.sqrt(1 - abar[s])
  first, _ = dpm_solver.dpm_solver_2m_step(schedule, x, s, t, x0, x0_prev, 0.0,
                                           first_order=True)
  np.testing.assert_allclose(first, np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * eps,
                             rtol=1e-12)
  final, final_h = dpm_solver.dpm_solver_2m_step(schedule, x, s, -1, x0, x0_prev, h_prev,
                                                 first_order=True)
  np.testing.assert_array_equal(final, x0)
  assert float(final_h) == 0.0


@pytest.mark.parametrize('objective', schedules.OBJECTIVES)
def test_two_steps_are_a_ddim_chain(x64, objective):
  # S = 2: a first-order step T-1 -> 0 (DDIM) and the x0 prediction at 0.
  schedule = schedules.make_schedule('sigmoid', 50)
  shape, rng = (2, 3, 3, 3), jax.random.key(1)
  fn = lambda x, t: 2.0 * stub_jax(x, t)  # Large enough that clipping is active.
  ours = dpm_solver.dpm_solver_2m_sample(fn, schedule, shape, rng, num_steps=2,
                                         objective=objective)
  x = diffusion._initial_noise(rng, shape, jnp.float64)
  zero = jnp.zeros(shape)
  for time, time_next in ((49, 0), (0, -1)):
    x, _ = diffusion.ddim_step(fn, schedule, x, time, time_next, zero, objective=objective)
  np.testing.assert_allclose(ours, x, rtol=1e-10, atol=1e-12)
  assert np.abs(ours).max() <= 1.0


# ----------------------------------------------------------------------------------------
# Closed form: with the optimal noise predictor of N(mu, s^2) data the probability-flow
# ODE maps N(0, 1) onto the data; the solver is then a linear map of x_T, whose output
# moments follow the scalar recursion below. The samples must match it within sampling
# error, and it must approach the data moments as the steps grow (second order).

# Relative variance bias allowed to the 20-step solver (the recursion gives 1.5-5%).
MAX_BIAS_20_STEPS = 0.06


def dpm_moments(schedule, mean, var, num_steps):
  """Mean and variance of the solver's output from x_T ~ N(0, 1); numpy recursion."""
  abar = schedule.alphas_cumprod
  times, times_next = map(np.asarray, dpm_solver.dpm_solver_timesteps(abar, num_steps))
  gain, shift = np.ones_like(mean), np.zeros_like(mean)  # x = gain x_T + shift.
  prev = h_prev = None
  for i, (s, t) in enumerate(zip(times, times_next)):
    k, d = _posterior_x0_gain(abar[s], mean, var)
    x0 = (k * gain, k * shift + d)
    if t < 0:
      return x0[1], x0[0] ** 2
    h = numpy_lambda(abar[t]) - numpy_lambda(abar[s])
    if i == 0 or t == 0:
      estimate = x0
    else:
      r = h_prev / h
      estimate = tuple(a + (a - b) / (2 * r) for a, b in zip(x0, prev))
    ratio, coef = np.sqrt((1 - abar[t]) / (1 - abar[s])), -np.sqrt(abar[t]) * np.expm1(-h)
    gain, shift = ratio * gain + coef * estimate[0], ratio * shift + coef * estimate[1]
    prev, h_prev = x0, h
  raise AssertionError('the times must end at -1')


@functools.partial(jax.jit, static_argnames=('num_steps',))
def _dpm_gaussian(schedule, rng, num_steps):
  fn = _optimal_noise_fn(schedule, DATA_MEAN, DATA_STD ** 2)
  return dpm_solver.dpm_solver_2m_sample(fn, schedule, SHAPE, rng, num_steps=num_steps,
                                         clip_denoised=False)


@pytest.mark.parametrize('name', ['linear', 'cosine', 'sigmoid'])
def test_reproduces_gaussian_data_in_20_steps(name):
  schedule = schedules.make_schedule(name, 500)
  data_var = DATA_STD ** 2
  biases = {}
  for num_steps in (5, 20):
    samples = np.asarray(_dpm_gaussian(schedules.schedule_as(schedule), jax.random.key(12),
                                       num_steps), np.float64).reshape(-1, 2)
    n = samples.shape[0]
    chain_mean, chain_var = dpm_moments(schedule, DATA_MEAN, data_var, num_steps)
    np.testing.assert_array_less(np.abs(samples.mean(0) - chain_mean),
                                 NUM_SIGMAS * np.sqrt(chain_var / n))
    np.testing.assert_array_less(np.abs(samples.var(0) / chain_var - 1),
                                 NUM_SIGMAS * np.sqrt(2 / n))
    np.testing.assert_allclose(chain_mean, DATA_MEAN, atol=1e-3)
    biases[num_steps] = np.abs(chain_var / data_var - 1)
    if num_steps == 20:
      np.testing.assert_array_less(biases[20], MAX_BIAS_20_STEPS)
      np.testing.assert_array_less(np.abs(samples.var(0) / data_var - 1),
                                   MAX_BIAS_20_STEPS + NUM_SIGMAS * np.sqrt(2 / n))
  # Convergence: more steps, closer to the data variance.
  np.testing.assert_array_less(biases[20], biases[5])


def test_all_steps_converge_to_the_ode_solution(x64):
  schedule = schedules.make_schedule('linear', 500)
  _, var = dpm_moments(schedule, DATA_MEAN, DATA_STD ** 2, 500)
  np.testing.assert_allclose(var, DATA_STD ** 2, rtol=2e-3)
