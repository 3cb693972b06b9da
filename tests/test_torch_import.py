"""Tests of eo_ddpm_jax.torch_import against checkpoints the PyTorch library itself writes.

The Trainer-format files are made as `Trainer.save` makes them (1.10.12), without the
Trainer class (its datasets need torchvision): a `Unet`, a `GaussianDiffusion`, an
`ema_pytorch.EMA` around the diffusion model and a torch Adam with the Trainer's betas,
after a few real optimisation steps on random images.
"""

import functools
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from eo_ddpm_jax import checkpoints
from eo_ddpm_jax import config_check
from eo_ddpm_jax import diffusion
from eo_ddpm_jax import run_config
from eo_ddpm_jax import schedules
from eo_ddpm_jax import torch_convert
from eo_ddpm_jax import torch_import
from eo_ddpm_jax import train_step
from tests.test_train_e2e import data_dir, env  # pylint: disable=unused-import
from tests.torch_oracle import load_ddpm_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # Image side of the tiny runs.
TIMESTEPS = 50
TRAIN_STEPS = 3  # Optimizer steps before the checkpoint is written.
UNET = dict(dim=16, dim_mults=(1, 2))
# Per-stage heads, full attention outside and linear inside, self-conditioning.
UNET_VARIANT = dict(dim=16, dim_mults=(1, 2), attn_heads=(2, 4), attn_dim_head=(8, 16),
                    full_attn=(True, False), self_condition=True)
# A one-stage Unet for the CLI runs: compiling the train step is their cost.
UNET_CLI = dict(dim=8, dim_mults=(1,), attn_heads=1, attn_dim_head=8)
ADAM = dict(lr=1e-3, betas=(0.9, 0.99))  # The Trainer's adam_betas.
BATCH = 4  # Of the random training images.


@pytest.fixture(scope='module')
def lib():
  return load_ddpm_library()


@pytest.fixture(scope='module')
def torch():
  return importlib.import_module('torch')  # The [torch] extra; the oracle needs it.


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread(torch):
  """Tiny models: torch's thread pool only contends with JAX (3 steps: 18 s vs 0.4 s)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def base_config():
  config = default.get_config()
  config.model.dtype = 'float32'
  return config


def make_trainer_checkpoint(lib, path, *, unet_kwargs=None, beta_schedule='sigmoid',
                            objective='pred_v', min_snr_gamma=None, schedule_fn_kwargs=None,
                            steps=TRAIN_STEPS, seed=0):
  """Trains the library's model a few steps and saves what Trainer.save would.

  Returns:
    dict: diffusion (GaussianDiffusion), ema (ema_pytorch.EMA), opt (torch Adam).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from ema_pytorch import EMA  # pylint: disable=g-import-not-at-top
  from denoising_diffusion_pytorch import version  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = lib.Unet(**(unet_kwargs or UNET))
  gaussian = lib.GaussianDiffusion(
      model, image_size=SIZE, timesteps=TIMESTEPS, objective=objective,
      beta_schedule=beta_schedule, schedule_fn_kwargs=schedule_fn_kwargs or {},
      min_snr_loss_weight=min_snr_gamma is not None, min_snr_gamma=min_snr_gamma or 5)
  # As Trainer.__init__: the EMA wraps the diffusion model, hence `ema_model.model.*`.
  ema = EMA(gaussian, beta=0.995, update_every=10)
  opt = torch.optim.Adam(gaussian.parameters(), **ADAM)
  for _ in range(steps):  # As Trainer.train, without accelerate.
    loss = gaussian(torch.rand(BATCH, model.channels, SIZE, SIZE))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(gaussian.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    ema.update()
  torch.save({'step': steps, 'model': gaussian.state_dict(), 'opt': opt.state_dict(),
              'ema': ema.state_dict(), 'scaler': None,
              'version': version.__version__}, path)
  return dict(diffusion=gaussian, ema=ema, opt=opt)


def restore(result):
  """The imported TrainState, restored as training restores it (data state too)."""
  model, state, data_state, step = restore_latest(
      result.config, os.path.dirname(result.config_path))
  assert data_state is None and step == result.step  # The importer saves no data position.
  return model, state


def restore_latest(config, workdir):
  """(model, state, data_state, step) of the newest checkpoint of `workdir`."""
  model = train_step.create_model(config.model)
  tx = train_step.create_optimizer(config.optim, optax.constant_schedule(0.0))
  abstract = jax.eval_shape(functools.partial(
      train_step.create_train_state, config, model, tx,
      image_shape=(config.data.image_size,) * 2 + (config.model.channels,)),
      jax.random.PRNGKey(config.seed))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = checkpoints.abstract_with_sharding(abstract,
                                                jax.tree.map(lambda _: device, abstract))
  manager = checkpoints.open_manager(workdir)
  state, data_state, step = checkpoints.restore_latest(manager, abstract, move_aside=False)
  manager.close()
  return model, state, data_state, step


@functools.partial(jax.jit, static_argnums=0)
def apply_unet(model, params, x, t, self_cond=None):
  """The U-Net's output; compiled once per architecture (modules compare by value)."""
  return model.apply({'params': params}, x, t, self_cond)


def relative_error(actual, reference):
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  return np.linalg.norm(actual - reference) / np.linalg.norm(reference)


def torch_unet_output(torch, unet, x, t, self_cond=None):
  to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = unet(to_nchw(x), torch.from_numpy(t),
               None if self_cond is None else to_nchw(self_cond))
  return out.numpy().transpose(0, 2, 3, 1)


def inputs(channels=3, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, SIZE, SIZE, channels)).astype(np.float32)
  return x, rng.integers(0, TIMESTEPS, size=(2,)), rng.standard_normal(x.shape).astype(
      np.float32)


@pytest.fixture(scope='module')
def imported(lib, tmp_path_factory):
  """The default case: sigmoid, pred_v, trained 3 steps, imported into a workdir."""
  base = tmp_path_factory.mktemp('imported')
  library = make_trainer_checkpoint(lib, base / 'model-1.pt')
  result = torch_import.import_trainer_checkpoint(
      str(base / 'model-1.pt'), str(base / 'run'), base_config=base_config(),
      image_size=SIZE)
  return library, result


@pytest.fixture(scope='module')
def restored(imported):
  """(library objects, ImportResult, model, restored TrainState) of the default import."""
  library, result = imported
  model, state = restore(result)
  return library, result, model, state


def test_inferred_config(imported):
  _, result = imported
  config = result.config
  assert result.source == 'trainer' and result.step == TRAIN_STEPS
  assert (config.model.dim, tuple(config.model.dim_mults), config.model.channels) == (
      16, (1, 2), 3)
  assert config.model.attn_heads == 4 and config.model.attn_dim_head == 32
  assert tuple(config.model.full_attn) == () and not config.model.self_condition
  assert config.model.resnet_block_groups == 8  # Not in the weights: the default.
  assert (config.diffusion.schedule, config.diffusion.timesteps,
          config.diffusion.objective, config.diffusion.min_snr_gamma) == (
              'sigmoid', TIMESTEPS, 'pred_v', 0.0)
  assert config.data.image_size == SIZE
  o = config.optim
  assert (o.learning_rate, o.b1, o.b2, o.eps, o.weight_decay) == (
      ADAM['lr'], *ADAM['betas'], 1e-8, 0.0)
  # The Trainer's constant learning rate.
  assert (o.warmup_steps, o.warmup_init_learning_rate, o.end_learning_rate) == (
      0, ADAM['lr'], ADAM['lr'])


def test_online_and_ema_unets_equal_library(restored, torch):
  library, _, model, state = restored
  x, t, _ = inputs()
  online = library['diffusion'].model.eval()
  ema = library['ema'].ema_model.model.eval()
  # The EMA copied the weights at the first update only: it differs from the online model.
  assert relative_error(torch_unet_output(torch, ema, x, t),
                        torch_unet_output(torch, online, x, t)) > 1e-3
  for params, reference in ((state.params, online), (state.ema_params, ema)):
    ours = apply_unet(model, params, x, t)
    assert relative_error(ours, torch_unet_output(torch, reference, x, t)) < 1e-5


def states_of(opt_state, kind):
  """The optax states of type `kind` inside opt_state."""
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, kind))
          if isinstance(s, kind)]


def test_adam_moments_and_counts_equal_torch(restored):
  library, _, _, state = restored
  opt = library['opt']
  adam = states_of(state.opt_state, optax.ScaleByAdamState)
  lr_counts = [s.count for s in states_of(state.opt_state, optax.ScaleByScheduleState)]
  assert len(adam) == 1 and int(adam[0].count) == TRAIN_STEPS
  assert [int(c) for c in lr_counts] == [TRAIN_STEPS]
  assert int(state.step) == TRAIN_STEPS
  # torch's moments by parameter name (from the live model, not from the file's order).
  named = dict(library['diffusion'].named_parameters())
  for moment, ours in (('exp_avg', adam[0].mu), ('exp_avg_sq', adam[0].nu)):
    expected = torch_convert.unet_params_from_torch(
        {name[len('model.'):]: opt.state[p][moment] for name, p in named.items()})
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ours), expected)
  assert float(np.abs(np.asarray(jax.tree.leaves(adam[0].nu)[0])).max()) > 0


def test_ddim_samples_equal_library(restored, torch, monkeypatch):
  library, result, model, state = restored
  num_steps, shape, rng = 10, (2, SIZE, SIZE, 3), jax.random.key(5)
  # The library's loop draws x_T with torch.randn and (eta = 0: unused) step noise.
  # pylint: disable=protected-access
  queue = [diffusion._initial_noise(rng, shape, jnp.float32)]
  queue += [diffusion._step_noise(rng, i, shape, jnp.float32) for i in range(num_steps - 1)]
  # pylint: enable=protected-access
  queue = [torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy()) for a in queue]
  monkeypatch.setattr(torch, 'randn', lambda *a, **k: queue.pop(0))
  monkeypatch.setattr(torch, 'randn_like', lambda x: queue.pop(0))
  gaussian = library['ema'].ema_model.eval()
  monkeypatch.setattr(gaussian, 'sampling_timesteps', num_steps)
  theirs = gaussian.ddim_sample((2, 3, SIZE, SIZE)).numpy().transpose(0, 2, 3, 1)
  assert not queue
  schedule = schedules.schedule_as(train_step.create_schedule(result.config.diffusion))
  ours = diffusion.ddim_sample(
      lambda x, t: apply_unet(model, state.ema_params, x, t), schedule, shape, rng,
      num_steps=num_steps, eta=0.0, objective=result.config.diffusion.objective)
  # The library returns [0, 1], this project [-1, 1].
  np.testing.assert_allclose(np.asarray(ours), theirs * 2 - 1, atol=1e-3)
  assert np.std(theirs) > 0.05


def load_written_config(path):
  spec = importlib.util.spec_from_file_location('imported_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('case', [
    dict(beta_schedule='linear', objective='pred_noise'),
    dict(beta_schedule='cosine', objective='pred_x0', min_snr_gamma=5.3),
    dict(beta_schedule='sigmoid', objective='pred_noise', min_snr_gamma=2.0,
         unet_kwargs=UNET_VARIANT),
    dict(beta_schedule='sigmoid', objective='pred_v', schedule_fn_kwargs=dict(
        start=-2.0, end=4.0, tau=0.7), name='custom'),
], ids=['linear', 'cosine-minsnr', 'sigmoid-variant', 'custom'])
def test_schedule_objective_and_architecture_inferred(lib, torch, tmp_path, case):
  case = dict(case)
  name = case.pop('name', case['beta_schedule'])
  library = make_trainer_checkpoint(lib, tmp_path / 'model.pt', steps=1, **case)
  result = torch_import.import_trainer_checkpoint(
      str(tmp_path / 'model.pt'), str(tmp_path / 'run'), base_config=base_config(),
      image_size=SIZE)
  d = result.config.diffusion
  assert (d.schedule, d.timesteps, d.objective) == (name, TIMESTEPS, case['objective'])
  assert d.min_snr_gamma == case.get('min_snr_gamma', 0.0)
  # The written config file reproduces the run on its own.
  written = load_written_config(result.config_path)
  assert written.to_dict() == result.config.to_dict()
  # And config.json, as training writes it, for --mode=report.
  saved = run_config.load_config(str(tmp_path / 'run'))
  assert run_config.checkpoint_mismatches(saved, written) == []
  assert saved.diffusion.schedule == name
  assert os.path.exists(tmp_path / 'run' / 'betas.npy') == (name == 'custom')
  # Every table equals the library's float32 buffer to float32 rounding; custom tables
  # start from float32 betas, whose rounding grows along the cumulative product.
  rtol = 1e-4 if name == 'custom' else 1e-6
  ours = train_step.create_schedule(written.diffusion)
  buffers = library['diffusion'].state_dict()
  for field in ('betas', 'alphas_cumprod', 'posterior_variance', 'posterior_mean_coef2'):
    np.testing.assert_allclose(getattr(ours, field), buffers[field].numpy(), rtol=rtol)
  np.testing.assert_allclose(
      schedules.loss_weight(ours, d.objective, d.min_snr_gamma or None),
      buffers['loss_weight'].numpy(), rtol=1e-4)
  if 'unet_kwargs' in case:
    m = result.config.model
    assert (m.attn_heads, m.attn_dim_head, tuple(m.full_attn), m.self_condition) == (
        (2, 4), (8, 16), (True, False), True)
    model, state = restore(result)
    x, t, self_cond = inputs()
    reference = torch_unet_output(torch, library['ema'].ema_model.model.eval(), x, t,
                                  self_cond)
    ours = apply_unet(model, state.ema_params, x, t, self_cond)
    assert relative_error(ours, reference) < 1e-5
    assert any('self-condition' in note for note in result.notes)


# ----------------------------------------------------------------------------------------
# Bare state_dicts.

def test_unet_state_dict_imports_with_fresh_optimizer(lib, torch, tmp_path):
  torch.manual_seed(3)
  unet = lib.Unet(**UNET)
  torch.save(unet.state_dict(), tmp_path / 'unet.pt')
  result = torch_import.import_trainer_checkpoint(
      str(tmp_path / 'unet.pt'), str(tmp_path / 'run'), base_config=base_config(),
      image_size=SIZE, step=7)
  assert result.source == 'unet' and result.step == 7
  assert any('No optimizer state' in n for n in result.notes)
  assert any('EMA starts as a copy' in n for n in result.notes)
  assert result.config.diffusion.schedule == default.get_config().diffusion.schedule
  model, state = restore(result)
  jax.tree.map(np.testing.assert_array_equal, state.params, state.ema_params)
  adam = state.opt_state[1][0]
  assert int(adam.count) == 0 and not any(np.any(np.asarray(m)) for m in jax.tree.leaves(
      (adam.mu, adam.nu)))
  x, t, _ = inputs()
  ours = apply_unet(model, state.params, x, t)
  assert relative_error(ours, torch_unet_output(torch, unet.eval(), x, t)) < 1e-5


def test_gaussian_diffusion_state_dict_imports_at_step_zero(lib, torch, tmp_path):
  torch.manual_seed(4)
  gaussian = lib.GaussianDiffusion(lib.Unet(**UNET), image_size=SIZE, timesteps=TIMESTEPS,
                                   beta_schedule='cosine', objective='pred_x0')
  torch.save(gaussian.state_dict(), tmp_path / 'diffusion.pt')
  result = torch_import.import_trainer_checkpoint(
      str(tmp_path / 'diffusion.pt'), str(tmp_path / 'run'), base_config=base_config(),
      image_size=SIZE)
  assert (result.source, result.step) == ('diffusion', 0)
  assert (result.config.diffusion.schedule, result.config.diffusion.objective) == (
      'cosine', 'pred_x0')
  _, state = restore(result)
  assert int(state.step) == 0


# ----------------------------------------------------------------------------------------
# Bad input: each a TorchImportError naming the file or key.

@pytest.fixture(scope='module')
def trainer_file(lib, tmp_path_factory):
  path = tmp_path_factory.mktemp('bad') / 'model-1.pt'
  make_trainer_checkpoint(lib, path, steps=1)
  return path


def import_data(torch, tmp_path, data):
  path = tmp_path / 'edited.pt'
  torch.save(data, path)
  return torch_import.import_trainer_checkpoint(
      str(path), str(tmp_path / 'run'), base_config=base_config(), image_size=SIZE)


def edited(torch, trainer_file, edit):
  data = torch.load(trainer_file, weights_only=True)
  edit(data)
  return data


def test_random_bytes_are_not_a_checkpoint(tmp_path):
  path = tmp_path / 'noise.pt'
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(torch_import.TorchImportError,
                     match=f'{path} is not a checkpoint written by torch.save'):
    torch_import.import_trainer_checkpoint(str(path), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint file .*model-9.pt'):
    torch_import.import_trainer_checkpoint(str(tmp_path / 'model-9.pt'), str(tmp_path))


def test_non_dict_pickle_is_refused(torch, tmp_path):
  with pytest.raises(torch_import.TorchImportError, match='holds a list, not a dict'):
    import_data(torch, tmp_path, [torch.zeros(2), 3])


def test_pickled_module_needs_code_and_is_refused(torch, tmp_path):
  torch.save(torch.nn.Linear(2, 3), tmp_path / 'module.pt')
  with pytest.raises(torch_import.TorchImportError,
                     match=r'pickled Python object \(torch\.nn\.modules\.linear\.Linear\).*'
                           r'never runs code.*state_dict\(\)'):
    torch_import.import_trainer_checkpoint(str(tmp_path / 'module.pt'), str(tmp_path / 'r'))


def test_unknown_and_missing_keys_are_named(torch, tmp_path, trainer_file):
  def add_unknown(data):
    data['model']['model.mid_attn.extra'] = torch.zeros(3)
  with pytest.raises(torch_import.TorchImportError,
                     match=r"unknown key 'model\.mid_attn\.extra'"):
    import_data(torch, tmp_path, edited(torch, trainer_file, add_unknown))
  with pytest.raises(torch_import.TorchImportError,
                     match=r"missing key 'model\.ups\.0\.1\.block2\.proj\.bias'"):
    import_data(torch, tmp_path, edited(
        torch, trainer_file, lambda d: d['model'].pop('model.ups.0.1.block2.proj.bias')))
  with pytest.raises(torch_import.TorchImportError, match=r"missing key 'loss_weight'"):
    import_data(torch, tmp_path, edited(torch, trainer_file,
                                        lambda d: d['model'].pop('loss_weight')))
  with pytest.raises(torch_import.TorchImportError, match=r"unknown key 'lr_scheduler'"):
    import_data(torch, tmp_path, edited(
        torch, trainer_file, lambda d: d.update(lr_scheduler={})))
  with pytest.raises(torch_import.TorchImportError,
                     match=r"missing key 'step' of a Trainer checkpoint"):
    import_data(torch, tmp_path, edited(torch, trainer_file, lambda d: d.pop('step')))
  with pytest.raises(torch_import.TorchImportError,
                     match=r"unknown key 'ema\.shadow'"):
    import_data(torch, tmp_path, edited(
        torch, trainer_file, lambda d: d['ema'].update(shadow=torch.zeros(1))))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_shapes_that_fit_no_config_are_named(torch, tmp_path, trainer_file):
  def odd_stage(data):  # Stage 0 -> 24 channels: not a multiple of dim = 16.
    data['model']['model.downs.0.3.1.weight'] = torch.zeros(24, 64, 1, 1)
  pattern = r"key 'model\.downs\.0\.3\.1\.weight' has shape \(24, 64, 1, 1\)"
  with pytest.raises(torch_import.TorchImportError, match=pattern):
    import_data(torch, tmp_path, edited(torch, trainer_file, odd_stage))

  def wrong_mlp(data):
    data['model']['model.mid_block1.mlp.1.weight'] = torch.zeros(64, 63)
  with pytest.raises(torch_import.TorchImportError,
                     match=r"key 'model\.mid_block1\.mlp\.1\.weight' has shape \(64, 63\)"):
    import_data(torch, tmp_path, edited(torch, trainer_file, wrong_mlp))

  def wrong_moment(data):
    data['opt']['state'][0]['exp_avg'] = torch.zeros(3)
  with pytest.raises(torch_import.TorchImportError,
                     match=r"key 'opt\.state\.0\.exp_avg' has shape \(3,\)"):
    import_data(torch, tmp_path, edited(torch, trainer_file, wrong_moment))


@pytest.mark.parametrize('kwargs,pattern', [
    (dict(learned_variance=True), r"key 'final_conv\.weight' has 6 output channels for 3 "
                                  r'input channels: a learned-variance Unet'),
    (dict(learned_sinusoidal_cond=True), r"key 'time_mlp\.0\.weights' belongs to learned "
                                         r'or random Fourier time features'),
    (dict(init_dim=24), r"key 'init_conv\.weight' has shape \(24, 3, 7, 7\): init_dim=24 "
                        r'differs from dim=16'),
])
def test_unet_variants_without_a_counterpart_are_refused(lib, torch, tmp_path, kwargs,
                                                         pattern):
  with pytest.raises(torch_import.TorchImportError, match=pattern):
    import_data(torch, tmp_path, lib.Unet(**UNET, **kwargs).state_dict())
  assert not (tmp_path / 'run').exists()


def _as_version_2(data):
  """Renames the ResNet blocks' GroupNorm params to 2.x's RMSNorm gain `g`."""
  model = data['model']
  for key in [k for k in model if '.norm.' in k and '.block' in k]:
    value = model.pop(key)
    if key.endswith('.weight'):
      model[key[:-len('weight')] + 'g'] = value.reshape(1, -1, 1, 1)


def test_version_2_is_refused(torch, tmp_path, trainer_file):
  with pytest.raises(torch_import.TorchImportError,
                     match=r'written by denoising-diffusion-pytorch 2\.0\.0; supported: '
                           r'1\.x \(tested with 1\.10\.12\)'):
    import_data(torch, tmp_path, edited(torch, trainer_file,
                                        lambda d: d.update(version='2.0.0')))
  # A bare 2.x state_dict carries no version: its RMSNorm keys give it away.
  state_dict = edited(torch, trainer_file, _as_version_2)['model']
  with pytest.raises(torch_import.TorchImportError,
                     match=r"key 'model\.downs\.0\.0\.block1\.norm\.g' is an RMSNorm gain.*"
                           r'supported: 1\.x \(tested with 1\.10\.12\)'):
    import_data(torch, tmp_path, state_dict)


def test_ema_counter_unlike_step_is_reported(torch, tmp_path, trainer_file):
  def skip_updates(data):
    data['ema']['step'] = torch.tensor(0)
  result = import_data(torch, tmp_path, edited(torch, trainer_file, skip_updates))
  assert any('EMA update counter (0) differs from the step (1)' in n for n in result.notes)


def test_custom_schedule_needs_its_betas_file(tmp_path):
  config = base_config()
  config.diffusion.schedule = schedules.CUSTOM_SCHEDULE
  config.diffusion.betas_file = str(tmp_path / 'betas.npy')
  with pytest.raises(config_check.ConfigError,
                     match=r"diffusion\.betas_file=.* is not a file"):
    config_check.check_model_and_diffusion(config)
  np.save(tmp_path / 'betas.npy', np.full(TIMESTEPS + 1, 0.01))
  config.diffusion.timesteps = TIMESTEPS
  with pytest.raises(config_check.ConfigError, match=r'holds shape \(51,\), but '
                                                     r'diffusion\.timesteps=50'):
    config_check.check_model_and_diffusion(config)


def test_existing_run_is_not_overwritten(imported, trainer_file):
  _, result = imported
  workdir = os.path.dirname(result.config_path)
  with pytest.raises(torch_import.TorchImportError, match='already holds checkpoints'):
    torch_import.import_trainer_checkpoint(str(trainer_file), workdir,
                                           base_config=base_config(), image_size=SIZE)


# ----------------------------------------------------------------------------------------
# The command line: import, sample, continue training.

def _main(env, *args):
  return subprocess.run([sys.executable, '-m', 'eo_ddpm_jax.main', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True)


def test_config_flag_required_except_for_import(tmp_path):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from eo_ddpm_jax import main  # pylint: disable=g-import-not-at-top
  with flagsaver.flagsaver():
    main.FLAGS(['main', f'--workdir={tmp_path}', '--mode=train'])
    with pytest.raises(app.UsageError, match='--config is required for --mode=train'):
      main.main(['main'])
    main.FLAGS(['main', f'--workdir={tmp_path}', '--mode=import_torch'])
    with pytest.raises(app.UsageError, match='needs --torch_checkpoint'):
      main.main(['main'])


def test_cli_import_then_sample_and_continue_training(lib, tmp_path, env, data_dir):
  make_trainer_checkpoint(lib, tmp_path / 'model-1.pt', unet_kwargs=UNET_CLI)
  workdir = tmp_path / 'run'
  result = _main(env, '--mode=import_torch', f'--workdir={workdir}',
                 f'--torch_checkpoint={tmp_path / "model-1.pt"}',
                 f'--torch_image_size={SIZE}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Imported step {TRAIN_STEPS}' in result.stdout
  config = [f'--config={workdir / "config.py"}', '--config.model.dtype=float32']
  result = _main(env, *config, f'--workdir={workdir}', '--mode=sample',
                 '--config.sample.num_samples=2', '--config.sample.sampler=ddim',
                 '--config.sample.ddim_steps=3')
  assert result.returncode == 0, result.stderr[-3000:]
  images = np.load(workdir / 'samples' / f'step_{TRAIN_STEPS}_ddim3.npy')
  assert images.shape == (2, SIZE, SIZE, 3) and np.all(np.abs(images) <= 1)

  # Two more steps; batch 2 makes 8 steps an epoch, so no epoch ends (no sample grid).
  final = TRAIN_STEPS + 2
  result = _main(env, *config, f'--workdir={workdir}', '--mode=train',
                 f'--config.data.data_dir={data_dir}', '--config.train.batch_size=2',
                 f'--config.train.max_steps={final}', '--config.train.num_epochs=1',
                 '--config.train.progress_bar=False')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resuming from step {TRAIN_STEPS}' in result.stderr
  with open(workdir / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f]
  assert [r['step'] for r in logged] == list(range(TRAIN_STEPS + 1, final + 1))
  assert all(r['learning_rate'] == pytest.approx(ADAM['lr']) for r in logged)
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints'))
  assert steps == [TRAIN_STEPS, final]
  _, state, data_state, step = restore_latest(
      load_written_config(workdir / 'config.py'), str(workdir))
  assert step == int(state.step) == final and data_state is not None
  assert int(state.opt_state[1][0].count) == final  # Adam's count went on from torch's.
