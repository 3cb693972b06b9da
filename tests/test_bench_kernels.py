"""Tests for bench/linear_attention_kernels.py: each tiling it times is its own kernel."""

import re

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
