"""Tests of the configs and of eo_ddpm_jax.config_check: every error names its key."""

import importlib
import os
import subprocess
import sys

import jax
import pytest

from configs import default
from eo_ddpm_jax import config_check
from eo_ddpm_jax import train
from eo_ddpm_jax import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('name', ['linear', 'cosine', 'sigmoid'])
def test_study_configs_hold_the_studys_settings(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.diffusion.schedule == name
  assert config.diffusion.timesteps == 500
  assert (config.model.dim, tuple(config.model.dim_mults)) == (64, (1, 2, 4))
  assert config.data.image_size == 128
  assert config.train.batch_size == 8 and config.train.num_epochs == 11
  assert config.optim.learning_rate == 2e-5 and config.optim.grad_clip_norm == 1.0
  assert config.optim.ema_decay == 0.995 and config.optim.end_learning_rate == 0.0
  assert config.model.dtype == 'bfloat16'
  assert config.diffusion.objective == 'pred_noise'
  config_check.check_config(config, num_devices=1, need_data=False)


@pytest.mark.parametrize('name', ['demo', 'demo_study'])
def test_demo_configs_are_valid(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_check.check_config(config, num_devices=2, need_data=False)
  assert config.data.image_size == 32
  # Evaluation reads per-epoch checkpoints (60 steps an epoch): each asked-for step is one.
  total_steps = config.train.num_epochs * 480 // config.train.batch_size
  assert all(s % 60 == 0 and s <= total_steps for s in config.eval.checkpoint_steps)


def test_demo_study_keeps_the_studys_diffusion_and_attention():
  # docs/demo_report and docs/library_demo_samples.png were made with the study's values.
  config = importlib.import_module('configs.demo_study').get_config()
  study = importlib.import_module('configs.sigmoid').get_config()
  assert config.diffusion.to_dict() == study.diffusion.to_dict()
  assert (config.model.attn_heads, config.model.attn_dim_head) == (
      study.model.attn_heads, study.model.attn_dim_head)


@pytest.mark.parametrize('key, value, num_devices, pattern', [
    ('diffusion.schedule', 'quadratic', 1,
     r"diffusion.schedule='quadratic' is unknown; valid values: linear, cosine, sigmoid"),
    ('diffusion.objective', 'pred_eps', 1,
     r"diffusion.objective='pred_eps' is unknown; valid values: pred_noise, pred_x0, pred_v"),
    ('train.batch_size', 6, 4,
     r'train.batch_size=6 must be divisible by the number of devices \(4\)'),
    ('train.grad_accum_steps', 3, 1, r'train.batch_size=8 must be divisible .* = 3'),
    ('train.cpu_devices', -2, 1, r'train.cpu_devices=-2 must be >= 0 \(0: one per core'),
    ('data.image_size', 90, 1,
     r'data.image_size=90 must be divisible by 4, .* model.dim_mults=\(1, 2, 4\)'),
    ('model.dtype', 'float16', 1, r"model.dtype='float16' is unknown; valid values"),
    ('sample.sampler', 'euler', 1, r"sample.sampler='euler' is unknown; valid values: ddpm, ddim"),
])
def test_config_errors_name_key_and_valid_values(key, value, num_devices, pattern):
  config = default.get_config()
  group, field = key.split('.')
  config[group][field] = value
  with pytest.raises(config_check.ConfigError, match=pattern):
    config_check.check_config(config, num_devices=num_devices, need_data=False)


def test_missing_data_names_data_dir_and_build_command(tmp_path):
  config = default.get_config()
  config.data.data_dir = str(tmp_path / 'nothing_here')
  with pytest.raises(config_check.ConfigError,
                     match=r'data.data_dir=.*nothing_here.* python -m tfds_sen12ms.build'):
    config_check.check_config(config, num_devices=1)


def test_train_rejects_bad_config_before_any_compute(tmp_path):
  config = default.get_config()
  config.diffusion.schedule = 'quadratic'
  with pytest.raises(config_check.ConfigError, match='diffusion.schedule'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # Nothing was written either.


@pytest.mark.parametrize('impl, dtype, pattern', [
    ('flash', 'bfloat16',
     r"model.attention_impl='flash' is unknown; valid values: auto, einsum, cudnn"),
    # This machine is a CPU: the fused kernel is refused before any compute.
    ('cudnn', 'bfloat16', r"model.attention_impl='cudnn' needs an NVIDIA GPU .* \(here: cpu"),
    ('cudnn', 'float32', r"needs an NVIDIA GPU and model.dtype=bfloat16 .*float32"),
])
def test_attention_impl_errors_name_key_and_fix(impl, dtype, pattern):
  config = default.get_config()
  config.model.attention_impl, config.model.dtype = impl, dtype
  with pytest.raises(config_check.ConfigError, match=pattern):
    config_check.check_config(config, num_devices=1, need_data=False)


@pytest.mark.parametrize('impl, pattern', [
    ('pallas', r"model.linear_attention_impl='pallas' is unknown; valid values: auto, "
               r"xla, triton, triton_interpret"),
    # This machine is a CPU: the GPU kernels are refused before any compute.
    ('triton', r"model.linear_attention_impl='triton' needs an NVIDIA GPU .* \(here: cpu, "
               r"bfloat16\); use auto or xla"),
])
def test_linear_attention_impl_errors_name_key_and_fix(impl, pattern):
  config = default.get_config()
  config.model.linear_attention_impl = impl
  with pytest.raises(config_check.ConfigError, match=pattern):
    config_check.check_config(config, num_devices=1, need_data=False)


def test_configs_without_linear_attention_impl_resolve_as_auto():
  """Config files written before model.linear_attention_impl existed (torch import's)
  check and build the model; on this CPU that is the XLA linear attention."""
  config = default.get_config()
  del config.model['linear_attention_impl']
  config_check.check_config(config, num_devices=1, need_data=False)
  assert train_step.create_model(config.model).linear_attention_impl == 'xla'


@pytest.mark.parametrize('name, dtype, backend, card, expected', [
    ('auto', 'bfloat16', 'gpu', '9.0', 'triton'),   # H100, H200
    ('auto', 'bfloat16', 'gpu', '8.0', 'triton'),   # A100
    ('auto', 'bfloat16', 'gpu', '8.6', 'xla'),      # less shared memory per block
    ('auto', 'bfloat16', 'gpu', None, 'xla'),       # a GPU that is not NVIDIA's
    ('auto', 'float32', 'gpu', '9.0', 'xla'),  # float32 keeps the version held to PyTorch's.
    ('auto', 'bfloat16', 'cpu', None, 'xla'),
    ('auto', 'bfloat16', 'tpu', None, 'xla'),
    ('xla', 'bfloat16', 'gpu', '9.0', 'xla'),
    ('triton_interpret', 'bfloat16', 'cpu', None, 'triton_interpret'),
])
def test_auto_linear_attention_picks_the_kernels_only_where_they_run(name, dtype, backend,
                                                                     card, expected,
                                                                     monkeypatch):
  class Device:  # What jax.local_devices(backend='gpu') would give on that card.
    if card is not None:
      compute_capability = card
  monkeypatch.setattr(jax, 'local_devices', lambda backend=None: [Device()])
  assert train_step.linear_attention_impl(name, dtype, backend) == expected


@pytest.mark.parametrize('name, dtype, backend, expected', [
    ('auto', 'bfloat16', 'gpu', 'cudnn'),
    ('auto', 'float32', 'gpu', 'einsum'),  # cuDNN's fused kernel is 16-bit only.
    ('auto', 'bfloat16', 'cpu', 'einsum'),
    ('auto', 'bfloat16', 'tpu', 'einsum'),
    ('einsum', 'bfloat16', 'gpu', 'einsum'),
])
def test_auto_attention_picks_the_fused_kernel_only_where_it_runs(name, dtype, backend,
                                                                  expected):
  assert train_step.attention_impl(name, dtype, backend) == expected


def test_config_check_does_not_start_the_backend():
  """Checks run before jax.distributed.initialize, which must precede any backend use."""
  code = ('from jax._src import xla_bridge\n'  # Private, but the only way to ask.
          'from configs import default\n'
          'from eo_ddpm_jax import config_check\n'
          'config_check.check_config(default.get_config(), num_devices=1, need_data=False)\n'
          'print(xla_bridge.backends_are_initialized())\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, 'PYTHONPATH': ROOT}, check=True)
  assert result.stdout.strip() == 'False'
