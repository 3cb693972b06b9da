"""Tests of eo_ddpm_jax.schedules against denoising-diffusion-pytorch 1.10.12 and formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eo_ddpm_jax import schedules
from tests.torch_oracle import load_ddpm_library

# Relative tolerance of our float64 tables against the library's float64 formulas.
RTOL_TABLES = 1e-12


class _Float64Torch:
  """`torch` whose `float32` is float64: GaussianDiffusion registers its buffers with
  `val.to(torch.float32)`; seen through this, it keeps its float64 values."""

  def __init__(self, torch):
    self._torch = torch

  def __getattr__(self, name):
    return self._torch.float64 if name == 'float32' else getattr(self._torch, name)


def make_stub_model(torch, channels: int, forward):
  """A torch module that GaussianDiffusion accepts, computing forward(x, t)."""

  class Stub(torch.nn.Module):
    self_condition = False

    def __init__(self):
      super().__init__()
      self.channels = channels
      self.out_dim = channels

    def forward(self, x, t, x_self_cond=None):
      del x_self_cond
      return forward(x, t)

  return Stub()


def library_diffusion_float64(beta_schedule: str, timesteps: int, *, model=None,
                              schedule_fn_kwargs=None, **kwargs):
  """The library's GaussianDiffusion with every buffer computed and kept in float64.

  The library's own __init__ runs unchanged; only its float32 storage cast is turned
  off, so the buffers are its float64 formulas (the schedule functions, including the
  sigmoid's float32 end constants, are untouched).
  """
  library = load_ddpm_library()
  import torch  # pylint: disable=g-import-not-at-top
  if model is None:
    model = make_stub_model(torch, 3, lambda x, t: x)
  real_torch = library.torch
  library.torch = _Float64Torch(real_torch)
  try:
    diffusion = library.GaussianDiffusion(
        model, image_size=4, timesteps=timesteps, beta_schedule=beta_schedule,
        schedule_fn_kwargs=schedule_fn_kwargs or {}, auto_normalize=False, **kwargs)
  finally:
    library.torch = real_torch
  assert diffusion.betas.dtype == torch.float64
  return diffusion


@pytest.mark.parametrize('timesteps', [500, 1000])
@pytest.mark.parametrize('name', ['linear', 'cosine', 'sigmoid'])
def test_tables_equal_library_float64(name, timesteps):
  reference = library_diffusion_float64(name, timesteps)
  schedule = schedules.make_schedule(name, timesteps)
  ref_alphas_cumprod = reference.alphas_cumprod.numpy()
  for field in schedules.Schedule._fields:
    ours = getattr(schedule, field)
    assert ours.dtype == np.float64 and ours.shape == (timesteps,), field
    if field == 'snr':  # The library keeps it local to __init__; its formula:
      expected = ref_alphas_cumprod / (1 - ref_alphas_cumprod)
    else:
      expected = getattr(reference, field).numpy()
    np.testing.assert_allclose(ours, expected, rtol=RTOL_TABLES, atol=0, err_msg=field)


@pytest.mark.parametrize('objective', schedules.OBJECTIVES)
@pytest.mark.parametrize('gamma', [None, 5.0])
def test_loss_weight_equals_library(objective, gamma):
  reference = library_diffusion_float64(
      'sigmoid', 500, objective=objective, min_snr_loss_weight=gamma is not None,
      **({} if gamma is None else {'min_snr_gamma': gamma}))
  ours = schedules.loss_weight(schedules.make_schedule('sigmoid', 500), objective, gamma)
  np.testing.assert_allclose(ours, reference.loss_weight.numpy(), rtol=RTOL_TABLES, atol=0)


def test_schedule_parameters_reach_the_library_formulas():
  for name, params in [('cosine', {'s': 0.02}), ('sigmoid', {'start': -2., 'end': 4., 'tau': 0.7})]:
    reference = library_diffusion_float64(name, 300, schedule_fn_kwargs=params)
    ours = schedules.make_schedule(name, 300, **params)
    np.testing.assert_allclose(ours.alphas_cumprod, reference.alphas_cumprod.numpy(),
                               rtol=RTOL_TABLES, atol=0)


def test_sigmoid_keeps_the_library_float32_end_constants():
  # A pure-float64 port differs from the library by ~1e-5 relative; ours must not.
  timesteps = 500
  t = np.arange(timesteps + 1) / timesteps
  sig = lambda x: 1 / (1 + np.exp(-x))
  pure = (sig(3.) - sig(6. * t - 3.)) / (sig(3.) - sig(-3.))
  pure_betas = np.clip(1 - pure[1:] / pure[:-1], 0, schedules.MAX_BETA)
  ours = schedules.sigmoid_beta_schedule(timesteps)
  pure_alphas_cumprod = np.cumprod(1 - pure_betas)
  ours_alphas_cumprod = np.cumprod(1 - ours)
  assert np.max(np.abs(ours_alphas_cumprod / pure_alphas_cumprod - 1)) > 1e-6
  np.testing.assert_allclose(ours, pure_betas, rtol=1e-3)  # Yet the same schedule.


def test_linear_and_cosine_closed_forms():
  betas = schedules.linear_beta_schedule(500)
  assert betas[0] == pytest.approx(2e-4) and betas[-1] == pytest.approx(0.04)
  np.testing.assert_allclose(np.diff(betas), (0.04 - 2e-4) / 499, rtol=1e-9)
  schedule = schedules.make_schedule('cosine', 1000)
  t = np.arange(1, 1001) / 1000
  f = lambda u: np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  # Away from the end, where beta is clipped, abar(t) = f(t) / f(0).
  np.testing.assert_allclose(schedule.alphas_cumprod[:900], (f(t) / f(0))[:900], rtol=1e-9)
  assert schedule.betas[-1] == schedules.MAX_BETA


def test_derived_tables_satisfy_their_identities():
  s = schedules.make_schedule('sigmoid', 500)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - s.betas), rtol=1e-14)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod ** 2 + s.sqrt_one_minus_alphas_cumprod ** 2,
                             1, rtol=1e-14)
  # Posterior variance = 1 / (1 / (1 - abar_{t-1}) + alpha_t / beta_t) for t >= 1.
  alternative = 1 / (1 / (1 - s.alphas_cumprod_prev[1:]) + (1 - s.betas[1:]) / s.betas[1:])
  np.testing.assert_allclose(s.posterior_variance[1:], alternative, rtol=1e-10)
  assert s.posterior_variance[0] == 0
  assert s.posterior_log_variance_clipped[0] == np.log(schedules.POSTERIOR_VARIANCE_FLOOR)
  np.testing.assert_allclose(s.snr, s.alphas_cumprod / (1 - s.alphas_cumprod), rtol=1e-14)
  assert s.num_timesteps == 500


def test_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match='linear, cosine, sigmoid'):
    schedules.make_schedule('quadratic', 500)
  with pytest.raises(ValueError, match='cosine'):
    schedules.make_schedule('cosine', 500, tau=1.)
  with pytest.raises(ValueError, match='pred_noise, pred_x0, pred_v'):
    schedules.loss_weight(schedules.make_schedule('linear', 100), 'pred_eps')
  with pytest.raises(ValueError, match='every beta'):
    schedules.schedule_from_betas(np.array([0.1, 1.0]))


def test_schedule_is_a_pytree_usable_inside_jit():
  schedule = schedules.schedule_as(schedules.make_schedule('cosine', 100), jnp.float32)
  assert all(field.dtype == jnp.float32 for field in schedule)
  gather = jax.jit(lambda s, t: (s.sqrt_alphas_cumprod[t],
                                 schedules.loss_weight(s, 'pred_v', 5.0)[t]))
  t = jnp.array([0, 50, 99])
  value, weight = gather(schedule, t)
  numpy_schedule = schedules.make_schedule('cosine', 100)
  np.testing.assert_allclose(value, numpy_schedule.sqrt_alphas_cumprod[[0, 50, 99]], rtol=1e-6)
  np.testing.assert_allclose(
      weight, schedules.loss_weight(numpy_schedule, 'pred_v', 5.0)[[0, 50, 99]], rtol=1e-5)
