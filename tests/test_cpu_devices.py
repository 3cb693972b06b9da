"""Tests for eo_ddpm_jax.cpu_devices: how many CPU devices main.py asks JAX for."""

import subprocess
import sys

import pytest

from eo_ddpm_jax import cpu_devices
from tests import cli_helpers


@pytest.mark.parametrize('requested, cores, batch, expected', [
    (0, 2, 8, 2),   # One per core.
    (0, 4, 6, 3),   # 4 does not divide 6: the largest count that does.
    (0, 2, 25, 1),  # An odd batch stays on one device.
    (0, 16, 8, 8),  # Never more devices than batch rows.
    (0, 1, 8, 1),
    (3, 2, 9, 3),   # An explicit count is taken as given (config_check checks it).
    (1, 8, 8, 1),
])
def test_choose_count(requested, cores, batch, expected):
  assert cpu_devices.choose_count(requested, cores, batch) == expected


_PROBE = '''
import ml_collections, jax
from eo_ddpm_jax import cpu_devices
train = ml_collections.ConfigDict(dict(cpu_devices={requested}, batch_size={batch},
                                       grad_accum_steps=1, num_processes=0))
print(cpu_devices.configure(train), jax.device_count(), jax.devices()[0].platform)
'''


def _probe(tmp_path, requested, batch, xla_flags=None):
  """(count returned by configure, jax.device_count()) in a fresh CPU process."""
  env = cli_helpers.subprocess_env(tmp_path)
  env.pop('XLA_FLAGS', None)
  if xla_flags:
    env['XLA_FLAGS'] = xla_flags
  out = subprocess.run([sys.executable, '-c', _PROBE.format(requested=requested,
                                                            batch=batch)],
                       env=env, cwd=cli_helpers.ROOT, check=True, capture_output=True,
                       text=True).stdout.split()
  assert out[2] == 'cpu'
  return (None if out[0] == 'None' else int(out[0])), int(out[1])


def test_configure_creates_one_device_per_core(tmp_path):
  expected = cpu_devices.choose_count(0, cpu_devices.available_cores(), 8)
  assert _probe(tmp_path, 0, 8) == (expected if expected > 1 else None, expected)
  assert _probe(tmp_path, 3, 9) == (3, 3)
  assert _probe(tmp_path, 1, 8) == (None, 1)


def test_configure_keeps_an_xla_flags_device_count(tmp_path):
  assert _probe(tmp_path, 0, 8, '--xla_force_host_platform_device_count=3') == (None, 3)
  assert _probe(tmp_path, 2, 8, '--xla_force_host_platform_device_count=3') == (None, 3)
