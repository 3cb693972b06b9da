"""Tests for eo_ddpm_jax.torch_convert: the library's Unet and the Flax UNet agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eo_ddpm_jax import torch_convert
from eo_ddpm_jax import unet
from tests.torch_oracle import load_ddpm_library

# Two architectures: a 3-stage default one, and a 2-stage one with self-conditioning,
# full attention in the outer stage, linear in the inner one, per-stage heads and a
# learned-variance output.
CONFIGS = {
    'three_stages': (dict(dim=16, dim_mults=(1, 2, 4)), 32),
    'self_cond_full_attn': (dict(dim=16, dim_mults=(1, 2), self_condition=True,
                                 full_attn=(True, False), attn_heads=(2, 4),
                                 attn_dim_head=(8, 16), learned_variance=True), 16),
}
BATCH = 2
TIMESTEPS = 500


@pytest.fixture
def lib():
  return load_ddpm_library()


def _randomized_torch_unet(lib, kwargs, seed=0):
  """A library Unet whose every parameter is random: no gain at 1, no bias at 0."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = lib.Unet(**kwargs)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('.g') or '.norm.weight' in name:
        p.uniform_(0.5, 1.5)  # Norm gains.
      elif name.endswith('.bias'):
        p.uniform_(-0.5, 0.5)
      # Weights keep their random default init; mem_kv is already randn.
  for name, p in model.named_parameters():
    values = p.detach().numpy()
    assert not np.any(values == 0.0), name
    if name.endswith('.g') or '.norm.weight' in name:
      assert not np.any(values == 1.0), name
  return model.eval()


def _inputs(kwargs, size, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, size, size, 3))
  t = rng.integers(0, TIMESTEPS, size=(BATCH,))
  self_cond = rng.standard_normal(x.shape) if kwargs.get('self_condition') else None
  return x, t, self_cond


def _torch_forward(model, x, t, self_cond, dtype):
  """Runs the torch Unet on NHWC numpy inputs in `dtype`; returns NHWC numpy."""
  import torch  # pylint: disable=g-import-not-at-top
  previous = torch.get_default_dtype()
  # The Unet builds its time embedding in the default dtype.
  torch.set_default_dtype(dtype)
  try:
    model = model.to(dtype)
    to_nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2)).to(dtype)
    with torch.no_grad():
      out = model(to_nchw(x), torch.from_numpy(t),
                  None if self_cond is None else to_nchw(self_cond))
  finally:
    torch.set_default_dtype(previous)
  return out.numpy().transpose(0, 2, 3, 1)


def _relative_error(actual, reference):
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  return np.linalg.norm(actual - reference) / np.linalg.norm(reference)


def _flax_forward(kwargs, params, x, t, self_cond, dtype):
  model = unet.UNet(**kwargs, dtype=dtype)
  as_array = lambda a: None if a is None else jnp.asarray(a, dtype)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  apply = jax.jit(model.apply)
  out = apply({'params': params}, as_array(x), jnp.asarray(t), as_array(self_cond))
  return np.asarray(out)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_matches_library_float64(lib, x64, name):
  import torch  # pylint: disable=g-import-not-at-top
  kwargs, size = CONFIGS[name]
  model = _randomized_torch_unet(lib, kwargs)
  x, t, self_cond = _inputs(kwargs, size)
  reference = _torch_forward(model, x, t, self_cond, torch.float64)
  params = torch_convert.unet_params_from_torch(model.state_dict(), dtype=np.float64)
  actual = _flax_forward(kwargs, params, x, t, self_cond, jnp.float64)
  assert actual.dtype == np.float64
  assert actual.shape == reference.shape
  assert np.std(reference) > 0.1  # A non-degenerate output.
  assert _relative_error(actual, reference) < 1e-9


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_matches_library_float32(lib, name):
  import torch  # pylint: disable=g-import-not-at-top
  kwargs, size = CONFIGS[name]
  model = _randomized_torch_unet(lib, kwargs)
  x, t, self_cond = _inputs(kwargs, size)
  reference = _torch_forward(model, x, t, self_cond, torch.float32)
  params = torch_convert.unet_params_from_torch(model.state_dict())
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
  actual = _flax_forward(kwargs, params, x, t, self_cond, jnp.float32)
  assert _relative_error(actual, reference) < 1e-4


def _numpy_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_round_trip_and_load_into_library(lib):
  import torch  # pylint: disable=g-import-not-at-top
  kwargs, _ = CONFIGS['self_cond_full_attn']
  state = _numpy_state_dict(_randomized_torch_unet(lib, kwargs))
  params = torch_convert.unet_params_from_torch(state)  # Plain numpy input.
  back = torch_convert.unet_params_to_torch(params)
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  fresh = lib.Unet(**kwargs)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_params_fit_flax_model_exactly(lib):
  kwargs, size = CONFIGS['three_stages']
  params = torch_convert.unet_params_from_torch(
      _numpy_state_dict(_randomized_torch_unet(lib, kwargs)))
  shapes = jax.eval_shape(unet.UNet(**kwargs).init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32))
  expected = jax.tree.map(lambda s: s.shape, shapes['params'])
  assert jax.tree.map(np.shape, params) == expected


def test_prefix_reads_gaussian_diffusion_state_dict(lib):
  kwargs, size = CONFIGS['three_stages']
  model = _randomized_torch_unet(lib, kwargs)
  diffusion = lib.GaussianDiffusion(model, image_size=size, timesteps=10)
  state = diffusion.state_dict()
  params = torch_convert.unet_params_from_torch(state, prefix='model.')
  direct = torch_convert.unet_params_from_torch(model.state_dict())
  jax.tree.map(np.testing.assert_array_equal, params, direct)
  # Without the prefix, the diffusion buffers (betas, ...) are not Unet keys.
  hint = "unknown key .*start with 'model.': pass it as prefix"
  with pytest.raises(ValueError, match=hint):
    torch_convert.unet_params_from_torch(state)
  with pytest.raises(ValueError, match="prefix 'ema.'"):
    torch_convert.unet_params_from_torch(state, prefix='ema.')


def test_missing_key_is_named(lib):
  kwargs, _ = CONFIGS['three_stages']
  state = _numpy_state_dict(_randomized_torch_unet(lib, kwargs))
  del state['downs.1.2.to_out.1.g']
  with pytest.raises(ValueError, match=r"missing key 'downs\.1\.2\.to_out\.1\.g'"):
    torch_convert.unet_params_from_torch(state)
  prefixed = {'model.' + k: v for k, v in state.items()}
  with pytest.raises(ValueError, match=r"missing key 'model\.downs\.1\.2\.to_out\.1\.g'"):
    torch_convert.unet_params_from_torch(prefixed, prefix='model.')


def test_unknown_key_is_named(lib):
  kwargs, _ = CONFIGS['three_stages']
  state = _numpy_state_dict(_randomized_torch_unet(lib, kwargs))
  state['mid_attn.extra.weight'] = np.ones(3, np.float32)
  with pytest.raises(ValueError, match=r"unknown key 'mid_attn\.extra\.weight'"):
    torch_convert.unet_params_from_torch(state)


def test_unknown_and_missing_flax_params_are_named():
  params = jax.eval_shape(unet.UNetTiny().init, jax.random.key(0),
                          jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32))['params']
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
  params['final_conv']['extra'] = np.zeros(2)
  with pytest.raises(ValueError, match="unknown param 'final_conv/extra'"):
    torch_convert.unet_params_to_torch(params)
  del params['final_conv']['extra'], params['mid_attn']['mem_kv']
  with pytest.raises(ValueError, match="missing param 'mid_attn/mem_kv'"):
    torch_convert.unet_params_to_torch(params)


def test_unshuffle_kernel_layout():
  """The (c, p1, p2) -> (p1, p2, c) permutation, checked element by element."""
  out_ch, in_ch = 3, 5
  w = np.arange(out_ch * in_ch * 4, dtype=np.float64).reshape(out_ch, in_ch * 4, 1, 1)
  # pylint: disable=protected-access
  k = torch_convert._unshuffle_to_flax(w)
  assert k.shape == (1, 1, 4 * in_ch, out_ch)
  for o in range(out_ch):
    for c in range(in_ch):
      for p1 in range(2):
        for p2 in range(2):
          assert k[0, 0, (p1 * 2 + p2) * in_ch + c, o] == w[o, c * 4 + p1 * 2 + p2, 0, 0]
  np.testing.assert_array_equal(torch_convert._unshuffle_to_torch(k), w)
