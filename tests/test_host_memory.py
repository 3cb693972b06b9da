"""Tests for eo_ddpm_jax.host_memory: XLA:CPU's buffers reused instead of faulted in anew.

The reference is the kernel's count of minor page faults (getrusage), in a fresh process.
"""

import importlib.util
import subprocess
import sys

import pytest

from eo_ddpm_jax import host_memory
from tests import cli_helpers

# A jitted program with a 128 MiB temporary (the cumulative sum; only every 4096th value
# is returned), i.e. 32,768 pages that XLA:CPU allocates and frees on every call.
_PROBE = '''
import resource, statistics, time
from eo_ddpm_jax import host_memory
kept = host_memory.keep_freed_memory() if {keep} else False
import jax, jax.numpy as jnp
program = jax.jit(lambda x: jnp.cumsum(x * 2)[::4096])
x = jnp.ones((32 * 2**20,), jnp.float32)
faults = []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  program(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  time.sleep(0.1)  # XLA frees a call's buffers asynchronously, after its result is ready.
# The median of the last calls: the kept heap needs a few calls to settle (small
# allocations land in freed blocks, so big ones grow the heap a few times first).
print(kept, statistics.median(faults[6:]))
'''
_PAGES = 32 * 2**20 * 4 // 4096


def _faults_of_a_warm_call(tmp_path, keep: bool) -> tuple[bool, int]:
  env = cli_helpers.subprocess_env(tmp_path)  # JAX_PLATFORMS=cpu.
  out = subprocess.run([sys.executable, '-c', _PROBE.format(keep=keep)], env=env,
                       cwd=cli_helpers.ROOT, check=True, capture_output=True,
                       text=True).stdout.split()
  return out[0] == 'True', float(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt only')
def test_kept_memory_is_reused_without_page_faults(tmp_path):
  _, faults_default = _faults_of_a_warm_call(tmp_path, keep=False)
  kept, faults_kept = _faults_of_a_warm_call(tmp_path, keep=True)
  assert kept
  # glibc's default: the freed 128 MiB were unmapped, so every call faults them in anew.
  assert faults_default >= _PAGES * 0.9, faults_default
  # Kept: a warm call reuses pages that earlier calls faulted in.
  assert faults_kept < _PAGES // 100, faults_kept


@pytest.mark.parametrize('platforms, expected', [('cpu', True), ('cpu,cuda', True),
                                                 ('cuda', False), ('tpu,cpu', False)])
def test_jax_platforms_decides(monkeypatch, platforms, expected):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert host_memory.jax_runs_on_cpu() is expected


def test_an_installed_accelerator_plugin_means_not_cpu(monkeypatch):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.delenv('JAX_PLATFORM_NAME', raising=False)
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: (
      object() if name == 'jax_cuda12_plugin' else real_find_spec(name, *a)))
  assert not host_memory.jax_runs_on_cpu()


def test_accelerator_hosts_keep_the_c_librarys_malloc(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert host_memory.keep_freed_memory() is False
