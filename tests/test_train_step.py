"""Tests of eo_ddpm_jax.train_step: EMA and learning-rate schedules, the step itself."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from eo_ddpm_jax import diffusion
from eo_ddpm_jax import train_step as ts

EMA = dict(beta=0.995, update_every=10, update_after_step=100, inv_gamma=1.0,
           power=2 / 3, min_value=0.0)


@pytest.mark.parametrize('k, expected', [
    (0, 0.0),       # First update: copy.
    (5, 1.0),       # Not a multiple of update_every: untouched.
    (100, 0.0),     # k <= update_after_step: copy.
    (110, 0.0),     # ema-pytorch's one-time `initted` copy.
    (111, 1.0),
    (120, 1 - 21 ** (-2 / 3)),  # e = (k + 1) - 100 - 1 = 20.
    (1000, 1 - 901 ** (-2 / 3)),
    (10 ** 6, 0.995),  # Capped at beta.
])
def test_ema_decay_closed_form(k, expected):
  assert float(ts.ema_decay(k, **EMA)) == pytest.approx(expected, rel=1e-6)


def test_ema_decay_min_value_floor():
  decay = ts.ema_decay(120, **{**EMA, 'min_value': 0.9})
  assert float(decay) == pytest.approx(0.9)


def test_ema_matches_ema_pytorch():
  """Same sequence of weights through ema_pytorch.EMA and our step-wise update."""
  torch = pytest.importorskip('torch')
  ema_pytorch = pytest.importorskip('ema_pytorch')
  model = torch.nn.Linear(3, 2)
  ema = ema_pytorch.EMA(model, beta=0.995, update_after_step=20, update_every=3,
                        inv_gamma=1.0, power=2 / 3, min_value=0.0)
  kwargs = {**EMA, 'update_after_step': 20, 'update_every': 3}
  rng = np.random.default_rng(0)
  ours = {'w': model.weight.detach().numpy().copy(), 'b': model.bias.detach().numpy().copy()}
  ours = jax.tree.map(jnp.asarray, ours)
  for k in range(120):
    w = rng.normal(size=(2, 3)).astype(np.float32)
    b = rng.normal(size=(2,)).astype(np.float32)
    with torch.no_grad():
      model.weight.copy_(torch.from_numpy(w))
      model.bias.copy_(torch.from_numpy(b))
    ema.update()
    ours = ts.update_ema(ours, {'w': jnp.asarray(w), 'b': jnp.asarray(b)},
                         ts.ema_decay(k, **kwargs))
    np.testing.assert_allclose(ours['w'], ema.ema_model.weight.detach().numpy(),
                               rtol=1e-6, atol=1e-6, err_msg=f'update {k}')
    np.testing.assert_allclose(ours['b'], ema.ema_model.bias.detach().numpy(),
                               rtol=1e-6, atol=1e-6, err_msg=f'update {k}')


def test_update_ema_copy_is_exact():
  ema = {'a': jnp.asarray([0.1, 0.2], jnp.float32)}
  new = {'a': jnp.asarray([1 / 3, 1e-7], jnp.float32)}
  np.testing.assert_array_equal(ts.update_ema(ema, new, jnp.float32(0.0))['a'], new['a'])
  np.testing.assert_array_equal(ts.update_ema(ema, new, jnp.float32(1.0))['a'], ema['a'])


def test_learning_rate_schedule_values():
  optim = default.get_config().optim
  optim.learning_rate, optim.warmup_steps = 1e-3, 100
  fn = ts.create_learning_rate_fn(optim, total_steps=1100)
  assert float(fn(0)) == 0.0
  assert float(fn(50)) == pytest.approx(5e-4, rel=1e-5)
  assert float(fn(100)) == pytest.approx(1e-3, rel=1e-5)
  # Cosine half-way through the decay: peak * (1 + cos(pi / 2)) / 2.
  assert float(fn(600)) == pytest.approx(5e-4, rel=1e-4)
  at_300 = 1e-3 * 0.5 * (1 + math.cos(math.pi * 200 / 1000))
  assert float(fn(300)) == pytest.approx(at_300, rel=1e-4)
  assert float(fn(1100)) == pytest.approx(0.0, abs=1e-12)


def test_learning_rate_rejects_long_warmup():
  optim = default.get_config().optim
  optim.warmup_steps = 10
  with pytest.raises(ValueError, match='optim.warmup_steps'):
    ts.create_learning_rate_fn(optim, total_steps=10)


def _gradient_tree(scale):
  """Leaves of several shapes and dtypes, like a U-Net's: conv kernel, bias, scalar."""
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  return {'conv': {'kernel': scale * jax.random.normal(keys[0], (3, 3, 4, 5))},
          'bias': scale * jax.random.normal(keys[1], (5,)),
          'gain': (scale * jax.random.normal(keys[2], ())).astype(jnp.bfloat16)}


def test_global_norm_is_the_norm_of_all_leaves_together():
  tree = _gradient_tree(2.0)
  flat = np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                         for leaf in jax.tree.leaves(tree)])
  assert float(jax.jit(ts.global_norm)(tree)) == pytest.approx(np.linalg.norm(flat), rel=1e-6)


@pytest.mark.parametrize('scale', [0.01, 3.0])  # Norm 0.14 (kept) and 43 (clipped).
def test_clip_by_global_norm_matches_optax(scale):
  """Same updates as optax.clip_by_global_norm and the same state, so a checkpoint's
  optimizer state is the same tree either way."""
  tree = _gradient_tree(scale)
  ours, theirs = ts.clip_by_global_norm(0.5), optax.clip_by_global_norm(0.5)
  state = ours.init(tree)
  assert jax.tree.structure(state) == jax.tree.structure(theirs.init(tree))
  got, _ = jax.jit(ours.update)(tree, state)
  want, _ = theirs.update(tree, theirs.init(tree))
  for g, w, leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(tree)):
    assert g.dtype == leaf.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=1e-2 if g.dtype == jnp.bfloat16 else 1e-5)
  clipped_norm = float(ts.global_norm(got))
  assert clipped_norm == pytest.approx(min(float(ts.global_norm(tree)), 0.5), rel=1e-2)


def test_gradients_are_pinned_to_the_row_major_layout():
  """The step pins every gradient leaf to the row-major layout of the stored params
  (XLA's layout constraint, which on a GPU keeps the conv kernels' updates out of cuDNN's
  filter layout), and the pinning leaves values alone."""
  tree = _gradient_tree(1.0)
  pinned = jax.jit(ts.in_row_major_layout)(tree)
  for got, want in zip(jax.tree.leaves(pinned), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(got, want)
  config = _tiny_config()
  model, tx, schedule, lr_fn, state = _setup(config)
  step = ts.make_train_step(config, model, tx, schedule, lr_fn)
  images = jnp.zeros((2, 8, 8, 3), jnp.float32)
  text = jax.jit(step).lower(state, {'image': images}).as_text()
  # Each constraint's result layout, minor to major: [3, 2, 1, 0] is row-major in 4-D.
  pinned_layouts = sorted(
      [int(d) for d in re.findall(r'\d+', dims)] for dims in
      re.findall(r'@LayoutConstraint.*result_layouts = \[dense<\[?([\d, ]*)', text))
  assert pinned_layouts == sorted(list(range(leaf.ndim))[::-1]
                                  for leaf in jax.tree.leaves(state.params))


def _tiny_config():
  config = default.get_config()
  config.data.image_size = 8
  config.model.dim, config.model.dim_mults = 8, (1, 2)
  config.model.attn_heads, config.model.attn_dim_head = 1, 8
  config.model.dtype = 'float32'
  config.diffusion.timesteps = 20
  config.optim.warmup_steps = 1
  return config


@functools.cache
def _initial_state():
  """The tiny U-Net's step-0 TrainState, made once: compiling init (threefry for each of
  its 163 params) takes ~25 s here. Every test's config has these shapes, and the
  optimizer state's structure does not depend on its settings."""
  config = _tiny_config()
  model = ts.create_model(config.model)
  tx = ts.create_optimizer(config.optim, ts.create_learning_rate_fn(config.optim, 10))
  return jax.jit(lambda rng: ts.create_train_state(config, model, tx, rng, (8, 8, 3)))(
      jax.random.PRNGKey(0))


def _setup(config, total_steps=10):
  model = ts.create_model(config.model)
  lr_fn = ts.create_learning_rate_fn(config.optim, total_steps)
  tx = ts.create_optimizer(config.optim, lr_fn)
  schedule = ts.create_schedule(config.diffusion)
  return model, tx, schedule, lr_fn, _initial_state()


def test_train_step_matches_hand_computed_update():
  """One step equals: loss/grad by hand, clip, AdamW, step 0 -> EMA copy."""
  config = _tiny_config()
  config.optim.warmup_steps = 0
  # A large epsilon keeps Adam's first step linear in tiny gradients, whose sign
  # would otherwise flip with rounding (update = lr * g / (|g| + eps)).
  config.optim.eps = 1e-3
  model, tx, schedule, lr_fn, state = _setup(config)
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3), minval=-1, maxval=1)
  step = ts.make_train_step(config, model, tx, schedule, lr_fn)
  new_state, metrics = jax.jit(step)(state, {'image': images})

  f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), schedule)
  def loss_fn(params):
    fn = lambda x, t: model.apply({'params': params}, x, t)
    return diffusion.training_loss(fn, f32, images, jax.random.fold_in(state.rng, 0))

  @jax.jit  # One compilation; op by op the reference takes ~50 s here.
  def reference(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = tx.update(grads, opt_state, params)
    return loss, grads, jax.tree.map(jnp.add, params, updates)

  loss, grads, expected = reference(state.params, state.opt_state)
  assert float(metrics['loss']) == pytest.approx(float(loss), rel=1e-5)
  assert float(metrics['grad_norm']) == pytest.approx(
      float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))), rel=1e-5)
  assert float(metrics['learning_rate']) == pytest.approx(config.optim.learning_rate)
  assert int(new_state.step) == 1
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Update 0 of the ema-pytorch schedule copies the new weights.
  for got, want in zip(jax.tree.leaves(new_state.ema_params), jax.tree.leaves(new_state.params)):
    np.testing.assert_array_equal(got, want)


def test_grad_accumulation_averages_micro_batches():
  """accum=2: loss is the mean of the micro-batch losses (rows 0,2 and 1,3)."""
  config = _tiny_config()
  config.train.grad_accum_steps = 2
  model, tx, schedule, lr_fn, state = _setup(config)
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3), minval=-1, maxval=1)
  _, metrics = jax.jit(ts.make_train_step(config, model, tx, schedule, lr_fn))(
      state, {'image': images})
  f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), schedule)
  rng = jax.random.fold_in(state.rng, 0)
  fn = functools.partial(lambda p, x, t: model.apply({'params': p}, x, t), state.params)
  loss_fn = jax.jit(diffusion.training_loss, static_argnums=0)
  micro = [loss_fn(fn, f32, images[i::2], jax.random.fold_in(rng, i)) for i in range(2)]
  assert float(metrics['loss']) == pytest.approx(float(sum(micro) / 2), rel=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_loss():
  config = _tiny_config()
  config.model.dtype = 'bfloat16'
  model, tx, schedule, lr_fn, state = _setup(config)
  images = jnp.zeros((2, 8, 8, 3), jnp.float32)
  new_state, metrics = jax.jit(ts.make_train_step(config, model, tx, schedule, lr_fn))(
      state, {'image': images})
  assert metrics['loss'].dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(new_state.params)} == {jnp.dtype('float32')}
  assert np.isfinite(float(metrics['loss']))
