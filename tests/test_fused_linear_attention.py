"""Tests for eo_ddpm_jax.fused_linear_attention: the Pallas kernels, run in Pallas'
interpreter on this CPU, against the library's linear attention written out step by
step (values and every gradient), and their use in the U-Net.

The kernels' Triton compile for an H100 (shared memory, block shapes) is checked with
bench/gpu_compile.py, which needs the GPU compiler; their speed needs a GPU.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eo_ddpm_jax import fused_linear_attention as fused
from eo_ddpm_jax import unet
from tests import cli_helpers
from tests import linear_attention_reference as reference

B, N, C, HEADS, D, F = 2, 256, 32, 2, 16, 32
CHUNK = 128  # 2 chunks of 256 positions (loop steps: see rows_per_step).
ARG_NAMES = ('y', 'w_q', 'w_k', 'w_v', 'w_out', 'mem_kv')


def _inputs(seed=0, key_scale=3.0, memory_key_scale=1.0):
  """(y, w_q, w_k, w_v, w_out, mem_kv), float32; key logits of about key_scale."""
  rng = np.random.default_rng(seed)
  draw = lambda shape, scale: jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
  mem_kv = draw((2, 4, HEADS, D), 1.0)
  mem_kv = mem_kv.at[0].multiply(memory_key_scale)
  return (draw((B, N, C), 1.0), draw((C, HEADS * D), C**-0.5),
          draw((C, HEADS * D), key_scale * C**-0.5), draw((C, HEADS, D), C**-0.5),
          draw((HEADS, D, F), (HEADS * D)**-0.5), mem_kv)


def _library(y, w_q, w_k, w_v, w_out, mem_kv):
  """The reference: q and k projected, then the library's steps, in y's dtype."""
  q, k = ((y @ w.astype(y.dtype)).reshape(B, N, HEADS, D) for w in (w_q, w_k))
  return reference.as_the_library_groups_it(q, k, y, w_v.astype(y.dtype),
                                            w_out.astype(y.dtype), mem_kv.astype(y.dtype),
                                            D**-0.5)


def _xla(y, w_q, w_k, w_v, w_out, mem_kv):
  """unet.linear_attention, the XLA version the kernels replace."""
  q, k = ((y @ w.astype(y.dtype)).reshape(B, N, HEADS, D) for w in (w_q, w_k))
  return unet.linear_attention(q, k, y, w_v, w_out, mem_kv, D**-0.5)


def _fused(*args):
  return fused.fused_linear_attention(*args, D**-0.5, chunk=CHUNK, interpret=True)


@pytest.fixture
def rows_per_step(monkeypatch):
  """Sets every kernel's loop step to `rows` rows of these C = F = 32 channels."""
  def set_rows(rows):
    for name, tiling in fused.TILINGS.items():
      monkeypatch.setitem(fused.TILINGS, name,
                          fused.Tiling(rows * C, tiling.num_warps, tiling.num_stages))
  return set_rows


def _value_and_grads(fn, args):
  weights = jnp.asarray(np.random.default_rng(7).standard_normal((B, N, F)), jnp.float32)
  loss = lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)) * weights)
  return fn(*args), jax.grad(loss, tuple(range(len(args))))(*args)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize('key_scale, memory_key_scale, rows', [
    (3.0, 1.0, 64),   # The keys' max over positions lies in the image; 2 steps a chunk.
    (3.0, 1.0, 16),   # The same in 8 steps of 16 rows.
    (0.5, 20.0, 64),  # It lies in the memory slots: the chunks' sums are rescaled to it.
])
def test_kernels_match_the_library_in_float32(key_scale, memory_key_scale, rows,
                                              rows_per_step):
  """Output and the gradients of y, the four projections and the memory equal the
  library's steps to float32 rounding, across chunks and loop steps whose maxima differ."""
  rows_per_step(rows)
  args = _inputs(key_scale=key_scale, memory_key_scale=memory_key_scale)
  out, grads = _value_and_grads(_fused, args)
  want_out, want_grads = _value_and_grads(_library, args)
  assert out.dtype == jnp.float32 and out.shape == (B, N, F)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  for name, got, want in zip(ARG_NAMES, grads, want_grads):
    assert _rel(got, want) < 1e-5, name


def test_each_heads_softmax_is_shifted_by_its_own_max(rows_per_step):
  """One head's query logits hundreds above the other's: shifted by the row's overall max,
  the other head's exponentials would all underflow to 0 (0/0). The kernels take each
  head's own max, as the library's softmax does, and match it."""
  rows_per_step(64)
  y, w_q, *rest = _inputs(seed=2)
  w_q = w_q.at[:, :D].multiply(100.0)   # Head 0's logits, ~100x larger.
  args = (y, w_q, *rest)
  out, grads = _value_and_grads(_fused, args)
  want_out, want_grads = _value_and_grads(_library, args)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  for name, got, want in zip(ARG_NAMES, grads, want_grads):
    assert _rel(got, want) < 1e-4, name


def test_kernels_in_bfloat16_are_as_close_to_float32_as_the_xla_version():
  """bfloat16 y: output and gradients are within bfloat16 rounding of the float32
  library, no further from it than unet.linear_attention in bfloat16 (plus a margin for
  rounding at other points); y's gradient stays bfloat16."""
  args32 = _inputs(seed=1)
  args16 = (args32[0].astype(jnp.bfloat16),) + args32[1:]
  # The reference sees the same rounded input.
  want_out, want_grads = _value_and_grads(_library, (args16[0].astype(jnp.float32),)
                                          + args32[1:])
  out, grads = _value_and_grads(_fused, args16)
  xla_out, xla_grads = _value_and_grads(_xla, args16)
  assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
  assert _rel(out, want_out) < 1e-2
  assert _rel(out, want_out) < 1.5 * _rel(xla_out, want_out)
  for name, got, xla, want in zip(ARG_NAMES, grads, xla_grads, want_grads):
    assert _rel(got, want) < 2e-2, name
    assert _rel(got, want) < 1.5 * _rel(xla, want) + 1e-3, name


@pytest.mark.parametrize('n, c, heads, d, reason', [
    (16384, 64, 4, 32, ''),     # The study's 128x128 layers.
    (4096, 128, 4, 32, ''),     # Its 64x64 decoder layer.
    (4096, 256, 4, 32, 'channels=256'),      # Over the H100's shared memory.
    (4096, 64, 4, 8, 'dim_head=8'),          # Under Triton's 16 for a GEMM.
    (4096, 48, 4, 32, 'channels=48'),        # Not a power of two.
    (100, 64, 4, 32, '100 positions'),       # Not whole blocks.
])
def test_unsupported_names_the_shape_that_does_not_fit(n, c, heads, d, reason):
  found = fused.unsupported(n, c, heads, d)
  assert (reason in found) if reason else found == ''


@pytest.mark.parametrize('target, device_capability, expected_rows', [
    (None, None, 64),     # This CPU (the interpreter): Hopper's table.
    (None, '9.0', 64),    # On an H100 or H200.
    (None, '8.0', 16),    # On an A100.
    ('8.0', None, 16),    # Compiling for a described A100 (bench/gpu_compile.py).
    ('9.0', '8.0', 64),   # The target named wins over the device.
])
def test_kernels_take_the_tilings_of_the_target_gpu(target, device_capability,
                                                    expected_rows, monkeypatch):
  """Every kernel's loop steps come from TILINGS (here 64 rows of C = 32 channels) or,
  for an A100 (compute capability 8.x), from A100_TILINGS (here 16 rows), by the named
  target or else JAX's first device; the lowered program's row slices show which."""
  for name in fused.TILINGS:
    monkeypatch.setitem(fused.TILINGS, name, fused.Tiling(64 * C, 4))
    monkeypatch.setitem(fused.A100_TILINGS, name, fused.Tiling(16 * C, 4))
  monkeypatch.setattr(fused, 'TARGET_COMPUTE_CAPABILITY', target)

  class Device:  # What jax.devices() would give on that card.
    if device_capability is not None:
      compute_capability = device_capability
  monkeypatch.setattr(jax, 'devices', lambda backend=None: [Device()])
  jax.clear_caches()  # A trace is cached by function, not by the tables.
  args = _inputs()
  loss = lambda *a: jnp.sum(_fused(*a))
  text = jax.jit(jax.grad(loss, tuple(range(6)))).lower(*args).as_text()
  rows = set(re.findall(rf'tensor<(\d+)x{C}x', text))
  assert str(expected_rows) in rows
  assert str(80 - expected_rows) not in rows  # The other table's 16 or 64.


def _unet(impl, dim_head, dtype=jnp.float32):
  return unet.UNet(dim=16, dim_mults=(1, 2), attn_heads=2, attn_dim_head=dim_head,
                   linear_attention_impl=impl, dtype=dtype)


def test_unet_with_the_kernels_is_as_accurate_as_the_xla_unet(x64):
  """The U-Net with interpreted kernels (its two 16x16 linear attentions) in float32:
  output and parameter gradients as close to the float64 U-Net as the float32 XLA
  U-Net's are (both ~3e-6 here); the params are the same tree."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  t = jnp.asarray([3, 400])
  params = _unet('xla', 16).init(jax.random.key(0), x, t)['params']
  # Larger memory keys and projections than init's, so the softmaxes are not flat.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 2 if any(getattr(k, 'key', '') in ('mem_kv', 'to_qkv') for k in p)
      else v, params)

  def value_and_grads(impl, dtype):
    model = _unet(impl, 16, dtype)
    cast = lambda tree: jax.tree.map(lambda v: v.astype(dtype), tree)
    loss = lambda p: jnp.sum(jnp.tanh(model.apply({'params': p}, x.astype(dtype), t)))
    return jax.jit(jax.value_and_grad(loss))(cast(params))

  value64, grads64 = value_and_grads('xla', jnp.float64)  # Falls back to XLA there.
  value, grads = value_and_grads('triton_interpret', jnp.float32)
  xla_value, xla_grads = value_and_grads('xla', jnp.float32)
  assert abs(value - value64) < 2 * abs(xla_value - value64) + 1e-5 * abs(value64)
  for (path, got), xla, want in zip(jax.tree_util.tree_leaves_with_path(grads),
                                    jax.tree.leaves(xla_grads), jax.tree.leaves(grads64)):
    assert got.dtype == jnp.float32
    assert _rel(got, want) < 2 * _rel(xla, want) + 1e-6, jax.tree_util.keystr(path)
    assert _rel(got, want) < 1e-4, jax.tree_util.keystr(path)


@pytest.mark.parametrize('dim_head, calls', [(16, 2), (8, 0)])
def test_unet_uses_the_kernels_only_where_the_shapes_fit(dim_head, calls):
  """Two linear attentions, each two kernels forward; with dim_head 8 (under Triton's
  16) both fall back to XLA."""
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  model = _unet('triton_interpret', dim_head)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t)
  jaxpr = jax.make_jaxpr(model.apply)(params, x, t)
  assert str(jaxpr).count('pallas_call') == 2 * calls


_TWO_DEVICE_SCRIPT = """
import json, sys
import re

import jax
import numpy as np
from bench import roofline
from eo_ddpm_jax import train_step
from tests import test_fused_linear_attention as t
args = t._inputs()
value_and_grads = lambda *a: t._value_and_grads(t._fused, a)
alone = jax.jit(value_and_grads)(*args)
mesh = train_step.make_mesh()
spec = jax.sharding.PartitionSpec
split, replicated = (jax.sharding.NamedSharding(mesh, s) for s in (spec('data'), spec()))
under_mesh = train_step.with_mesh(value_and_grads, mesh)
sharded = jax.jit(under_mesh, in_shardings=(split,) + (replicated,) * 5)(*args)
kernels = [eqn for eqn, _ in roofline.equations(jax.make_jaxpr(under_mesh)(*args).jaxpr)
           if eqn.primitive.name == 'pallas_call']
json.dump({'devices': jax.device_count(),
           'kernel_batches': [eqn.outvars[0].aval.shape[0] for eqn in kernels],
           'relative_differences': [
               float(np.abs(a - b).max() / np.abs(a).max())
               for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(sharded))]},
          open(sys.argv[1], 'w'))
"""


def test_split_over_two_devices_equals_one(tmp_path):
  """Traced under a mesh that splits the batch (as the train step and the samplers
  are), each kernel runs per device in a shard_map, and the output and all gradients
  (the weights' summed over devices) equal the single-device ones."""
  got = cli_helpers.run_script_on_cpu_devices(_TWO_DEVICE_SCRIPT, 2, tmp_path / 'out.json')
  assert got['devices'] == 2
  # Both kernels for the value, again for the gradient's forward, and both backward
  # kernels: each on its device's one image of two.
  assert got['kernel_batches'] == [1] * 6, got['kernel_batches']
  assert len(got['relative_differences']) == 1 + len(ARG_NAMES)
  assert max(got['relative_differences']) < 1e-5, got['relative_differences']
