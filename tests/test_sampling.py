"""Tests of eo_ddpm_jax.sampling: per-image keys, batching, sharding over devices, samplers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from eo_ddpm_jax import config_check
from eo_ddpm_jax import diffusion
from eo_ddpm_jax import dpm_solver
from eo_ddpm_jax import sampling
from eo_ddpm_jax import schedules
from eo_ddpm_jax import train_step as train_step_lib
from tests import cli_helpers

SIZE, T, STEPS = 8, 4, 3  # XLA unrolls short sampler loops: few steps compile fast.
# Convolutions of another batch size or shard may sum in another order: rounding only,
# but the random (untrained) U-Net amplifies it through the steps (measured up to 1.3e-4),
# while the images of different keys differ by ~1.
ATOL = 1e-3
SEED, COUNT = 11, 5
_ALONE = {}  # sampler -> reference images, computed once per test session.


@functools.lru_cache(maxsize=None)
def tiny_setup():
  """A tiny config, U-Net, float64 schedule and initialized params (deterministic)."""
  config = default.get_config()
  config.data.image_size = SIZE
  config.model.update(dim=8, dim_mults=(1,), attn_heads=1, attn_dim_head=8,
                      dtype='float32', attention_impl='einsum')
  config.diffusion.timesteps = T
  model = train_step_lib.create_model(config.model)
  schedule = train_step_lib.create_schedule(config.diffusion)
  return config, model, schedule, random_params(model, SIZE, seed=0)


def random_params(model, image_size, seed):
  """U-Net params drawn with NumPy: kernels N(0, 1 / fan_in), norms 1, biases 0.

  Flax's own init compiles its many threefry draws for 20-40 s on a busy 2-core CPU;
  only the shapes are taken from it here (eval_shape, no compile).
  """
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, image_size, image_size, 3)),
                            jnp.zeros((1,), jnp.int32))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if name in ("['scale']", "['g']"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == "['bias']":
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def images_sampled_alone(sampler):
  """COUNT images, image i sampled alone (batch 1) from fold_in(PRNGKey(SEED), i)."""
  if sampler not in _ALONE:
    _ALONE[sampler] = reference_images(sampler, *tiny_setup(), jax.random.PRNGKey(SEED),
                                       COUNT)
  return _ALONE[sampler]


def reference_images(sampler, config, model, schedule, params, rng, count):
  """Image i sampled alone (batch 1) from fold_in(rng, i), by the diffusion functions."""
  schedule = schedules.schedule_as(schedule, jnp.float32)
  common = dict(objective=config.diffusion.objective,
                input_scale=config.diffusion.input_scale, clip_denoised=True)
  run = {'ddpm': lambda *a: diffusion.ddpm_sample(*a, **common),
         'ddim': lambda *a: diffusion.ddim_sample(*a, num_steps=STEPS, eta=0.5, **common),
         'dpm_solver': lambda *a: dpm_solver.dpm_solver_2m_sample(*a, num_steps=STEPS,
                                                                  **common)}[sampler]
  denoise = lambda x, t: model.apply({'params': params}, x, t)
  size = config.data.image_size
  alone = jax.jit(lambda key: run(denoise, schedule, (1, size, size, 3), key))
  return np.concatenate([np.asarray(alone(jax.random.fold_in(rng, i)))
                         for i in range(count)])


def _sample_fn(config, model, schedule, sampler, batch_size, mesh=None):
  return sampling.make_sample_fn(config, model, schedule, sampler=sampler,
                                 batch_size=batch_size, num_steps=STEPS, eta=0.5,
                                 clip_denoised=True, mesh=mesh)


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim', 'dpm_solver'])
def test_generate_equals_images_sampled_alone(sampler):
  config, model, schedule, params = tiny_setup()
  rng = jax.random.PRNGKey(SEED)
  # 5 images in batches of 2: the last batch is padded with a sixth key and cut.
  images = sampling.generate(_sample_fn(config, model, schedule, sampler, 2), params, rng,
                             COUNT, 2)
  assert images.shape == (COUNT, SIZE, SIZE, 3) and images.dtype == np.float32
  np.testing.assert_allclose(images, images_sampled_alone(sampler), atol=ATOL)
  assert np.abs(images).max() <= 1.0 and images.std() > 0.1  # Clipped, not degenerate.
  assert np.abs(images[0] - images[1]).mean() > 0.1  # Different keys, different images.


_FOUR_DEVICE_SCRIPT = """
import json, sys
import jax
from eo_ddpm_jax import sampling, train_step
from tests.test_sampling import COUNT, SEED, tiny_setup, _sample_fn
config, model, schedule, params = tiny_setup()
mesh = train_step.make_mesh()
fn = _sample_fn(config, model, schedule, 'dpm_solver', 4, mesh)
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
out = fn(jax.device_put(params, replicated), sampling.image_keys(jax.random.PRNGKey(0), 0, 4))
json.dump({'devices': jax.device_count(), 'output_devices': len(out.sharding.device_set),
           'images': sampling.generate(fn, params, jax.random.PRNGKey(SEED), COUNT, 4).tolist()},
          open(sys.argv[1], 'w'))
"""


def test_sharded_over_four_devices_equals_unsharded(tmp_path):
  got = cli_helpers.run_script_on_cpu_devices(_FOUR_DEVICE_SCRIPT, 4, tmp_path / 'result.json')
  assert got['devices'] == 4 and got['output_devices'] == 4  # Really split over 4.
  four = np.asarray(got['images'])
  assert four.shape == (COUNT, SIZE, SIZE, 3)
  # Batches of 4 (the last padded with 3 keys) over 4 devices equal the unsharded
  # sampler's images, which test_generate_equals_images_sampled_alone checks against
  # these same references (batches of 2, one device).
  np.testing.assert_allclose(four, images_sampled_alone('dpm_solver'), atol=ATOL)


def test_sharded_batch_size_and_keys():
  assert sampling.sharded_batch_size(25, 4) == 28
  assert sampling.sharded_batch_size(8, 4) == 8
  assert sampling.sharded_batch_size(3, 1) == 3
  rng = jax.random.PRNGKey(5)
  keys = np.asarray(sampling.image_keys(rng, 3, 2))
  np.testing.assert_array_equal(keys[1], np.asarray(jax.random.fold_in(rng, 4)))
  assert sampling.sampler_steps('ddpm', 25, 500) == 500
  assert sampling.sampler_steps('dpm_solver', 25, 500) == 25


def test_sampler_names_and_steps_are_validated():
  config = default.get_config()
  config.eval.sampler = 'euler'
  with pytest.raises(config_check.ConfigError,
                     match="eval.sampler='euler' is unknown; valid values: ddpm, ddim, "
                           "dpm_solver"):
    config_check.check_model_and_diffusion(config)
  config = default.get_config()
  config.sample.sampler = 'dpm_solver'
  config_check.check_model_and_diffusion(config)  # A valid choice everywhere.
  config.sample.ddim_steps = 501
  with pytest.raises(config_check.ConfigError, match=r'sample.ddim_steps=501 must be in '
                                                     r'\[1, 500\]'):
    config_check.check_sampler_steps(config, 'sample')
  config.sample.sampler = 'ddpm'  # ddpm ignores the step count.
  config_check.check_sampler_steps(config, 'sample')
