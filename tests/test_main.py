"""Tests of the command line (eo_ddpm_jax.main) that need no training."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'eo_ddpm_jax.main', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True)


def test_evaluate_without_checkpoints_says_train_first(tmp_path):
  result = _main('--config=configs/demo.py', f'--workdir={tmp_path}', '--mode=evaluate')
  assert result.returncode != 0
  assert f'No checkpoint directory {tmp_path}/checkpoints; train first' in result.stderr


def test_report_without_runs_names_the_flag(tmp_path):
  result = _main('--config=configs/demo.py', f'--workdir={tmp_path}', '--mode=report')
  assert result.returncode != 0
  assert '--mode=report needs the runs to compare: --report_workdirs=DIR1,DIR2' in result.stderr


def test_bad_eval_sampler_names_key_and_choices(tmp_path):
  result = _main('--config=configs/demo.py', f'--workdir={tmp_path}', '--mode=evaluate',
                 '--config.eval.sampler=euler')
  assert result.returncode != 0
  assert ("eval.sampler='euler' is unknown; valid values: ddpm, ddim, dpm_solver"
          in result.stderr)


def test_unknown_config_key_is_rejected(tmp_path):
  result = _main('--config=configs/demo.py', f'--workdir={tmp_path}',
                 '--config.train.batch_sise=4')
  assert result.returncode != 0 and 'batch_sise' in result.stderr


def test_bad_override_names_key_before_compute(tmp_path):
  result = _main('--config=configs/demo.py', f'--workdir={tmp_path / "run"}',
                 '--config.diffusion.schedule=quadratic')
  assert result.returncode != 0
  assert "diffusion.schedule='quadratic' is unknown" in result.stderr
  assert not (tmp_path / 'run').exists()


def test_sample_without_checkpoint_says_train_first(tmp_path):
  result = _main('--config=configs/demo.py', f'--workdir={tmp_path}', '--mode=sample')
  assert result.returncode != 0 and 'train first' in result.stderr
