"""Tests for the benchmarks' kernel tilings: each tiling bench/linear_attention_kernels.py
times is its own kernel, and the benchmarks' --linear_attention_tilings flag."""

import os
import re
import subprocess
import sys
import textwrap

import jax.numpy as jnp

from bench import linear_attention_kernels as kernels_bench
from eo_ddpm_jax import fused_linear_attention as fused


def test_each_tiling_is_lowered_with_its_own_rows_per_step(monkeypatch):
  """Two tilings of the softmax_d(q) backward, lowered one after the other through the
  same function, as the benchmark's sweep does: 256 positions of 16 channels take loop
  steps of 64 rows (1024 elements) or 256 rows (4096 elements), which the lowered
  program's row slices show."""
  inputs = kernels_bench.layer_inputs(2, 256, 16, heads=4, dim_head=8, dtype=jnp.float32)
  fn, args = kernels_bench.kernel_calls(inputs, dim_head=8, interpret=True)[
      'apply_context_grad']
  rows = {}
  for elements in (1024, 4096):
    monkeypatch.setitem(fused.TILINGS, 'apply_context_grad', fused.Tiling(elements, 4))
    text = kernels_bench.lower_afresh(fn, args).as_text()
    rows[elements] = set(re.findall(r'tensor<(\d+)x16x', text))
  assert '64' in rows[1024] and '64' not in rows[4096]
  assert '256' in rows[4096]


def test_tilings_flag_is_applied_after_the_cpu_device_count(tmp_path):
  """bench/train_step.py's and bench/sample.py's set-up, in a fresh process: the study
  config, then `common.start_jax_devices`. Taking the tilings starts JAX's backend (the
  table depends on the GPU), so the device count must be set first; when study_config
  took them, setting 2 devices raised RuntimeError."""
  script = textwrap.dedent("""
      import jax
      from bench import common, train_step
      from eo_ddpm_jax import fused_linear_attention as fused
      args = train_step.parse_args(['--batch', '4', '--cpu_devices', '2',
                                    '--linear_attention_tilings', 'key_statistics=512/2/3'])
      config = common.study_config(args, args.batch)
      common.start_jax_devices(args, config)
      print(jax.device_count(), fused.tilings()['key_statistics'])
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': root, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split(maxsplit=1) == [
      '2', "Tiling(block_elements=512, num_warps=2, num_stages=3)\n"]
