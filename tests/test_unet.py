"""Tests for eo_ddpm_jax.unet: sizes, layouts and mixed precision of the Flax U-Net.

Numerical equality with the PyTorch library's Unet is tested in test_torch_convert.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import roofline  # Its jaxpr walker.
from eo_ddpm_jax import unet
from tests import cli_helpers
from tests import linear_attention_reference as reference


def _param_shapes(model, size=8, channels=3):
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t)['params']


@pytest.mark.parametrize('kwargs, expected', [
    # denoising-diffusion-pytorch 1.10.12 Unet sizes (the library's own counts).
    (dict(dim=64, dim_mults=(1, 2, 4, 8)), 35_719_555),
    (dict(dim=64, dim_mults=(1, 2, 4)), 9_908_483),
    (dict(dim=32, dim_mults=(1, 2, 4)), 2_612_867),
    (dict(dim=16, dim_mults=(1, 2)), 242_483),
])
def test_parameter_counts_match_library(kwargs, expected):
  shapes = _param_shapes(unet.UNet(**kwargs))
  assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == expected


def test_presets():
  count = lambda m: sum(math.prod(s.shape) for s in jax.tree.leaves(_param_shapes(m)))
  assert count(unet.UNetStudy()) == 9_908_483
  assert count(unet.UNetLibraryDefault()) == 35_719_555
  assert count(unet.UNetTiny()) == 242_483


def test_default_attention_layout():
  """Linear attention in outer stages, full in the innermost stage and the middle."""
  shapes = _param_shapes(unet.UNet(dim=16, dim_mults=(1, 2, 4)))
  linear = {name for name, p in shapes.items() if 'to_out_norm' in p}
  assert linear == {'downs_0_attn', 'downs_1_attn', 'ups_1_attn', 'ups_2_attn'}
  assert 'to_out_norm' not in shapes['mid_attn']
  # An empty tuple (the config's "default") means the same as None.
  assert jax.tree.map(np.shape, _param_shapes(unet.UNet(dim=16, dim_mults=(1, 2, 4),
                                                         full_attn=()))) == \
      jax.tree.map(np.shape, shapes)


def test_pixel_unshuffle_channel_order():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  y = np.asarray(unet.pixel_unshuffle(jnp.asarray(x)))
  assert y.shape == (2, 2, 3, 12)
  for p1 in range(2):
    for p2 in range(2):
      for c in range(3):
        np.testing.assert_array_equal(y[..., (p1 * 2 + p2) * 3 + c], x[:, p1::2, p2::2, c])


@pytest.mark.parametrize('splits, use_bias', [(1, True), (1, False), (3, True), (3, False)])
def test_pointwise_conv_is_a_1x1_conv(splits, use_bias):
  """Same params, values and gradients as nn.Conv(features, (1, 1)); `splits` slices its
  output channels."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 6, 4)), jnp.float32)
  conv = nn.Conv(9, (1, 1), use_bias=use_bias)
  pointwise = unet.PointwiseConv(9, use_bias=use_bias, splits=splits)
  params = conv.init(jax.random.key(1), x)
  # Same initialiser, so the same params from the same key.
  jax.tree.map(np.testing.assert_array_equal, pointwise.init(jax.random.key(1), x), params)
  params = jax.tree.map(  # A nonzero bias, so a misplaced bias slice would show.
      lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params)

  def conv_loss(params):
    return jnp.sum(jnp.sin(conv.apply(params, x)))

  def pointwise_loss(params):
    out = pointwise.apply(params, x)
    return jnp.sum(jnp.sin(jnp.concatenate(out, -1) if splits > 1 else out))

  out = pointwise.apply(params, x)
  parts = out if splits > 1 else (out,)
  assert len(parts) == splits and all(p.shape == (2, 5, 6, 9 // splits) for p in parts)
  np.testing.assert_allclose(np.concatenate(parts, -1), conv.apply(params, x),
                             rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               jax.grad(pointwise_loss)(params), jax.grad(conv_loss)(params))


def test_linear_attention_matches_the_concatenated_softmax(x64):
  """Values and gradients (q, k, input, both projections, memory) equal the library's
  order of operations: project v, concatenate the memory, softmax, project the output.
  Large key logits check the max subtraction."""
  rng = np.random.default_rng(0)
  b, n, heads, d, c, f = 2, 12, 3, 4, 5, 6
  q, k = (jnp.asarray(rng.standard_normal((b, n, heads, d)) * 3) for _ in range(2))
  k = k.at[0, 5, 1, 2].set(80.0)  # exp(80) would dominate without the shift.
  y = jnp.asarray(rng.standard_normal((b, n, c)))
  w_v = jnp.asarray(rng.standard_normal((c, heads, d)))
  w_out = jnp.asarray(rng.standard_normal((heads, d, f)))
  mem_kv = jnp.asarray(rng.standard_normal((2, 4, heads, d)))
  weights = jnp.asarray(rng.standard_normal((b, n, f)))
  args = (q, k, y, w_v, w_out, mem_kv)

  def loss(fn):
    return lambda *args: jnp.sum(jnp.sin(fn(*args, 0.5)) * weights)

  np.testing.assert_allclose(unet.linear_attention(*args, 0.5),
                             reference.as_the_library_groups_it(*args, 0.5),
                             rtol=1e-12, atol=1e-12)
  argnums = tuple(range(len(args)))
  grads = jax.grad(loss(unet.linear_attention), argnums)(*args)
  expected = jax.grad(loss(reference.as_the_library_groups_it), argnums)(*args)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def _softmax_attention(q, k, v, scale):
  """The textbook order: logits, row softmax, then the weighted sum of v."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * scale
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)


def test_full_attention_matches_the_softmax_formula(x64):
  """attention_in_einsums (heads-major, divided after p v) against softmax(q k^T) v:
  values and the gradients of q, k and v, with one logit large enough to overflow
  exp without the row maximum's shift."""
  rng = np.random.default_rng(1)
  b, n, m, heads, d = 2, 6, 9, 3, 4
  q = jnp.asarray(rng.standard_normal((b, n, heads, d)))
  k, v = (jnp.asarray(rng.standard_normal((b, m, heads, d))) for _ in range(2))
  q = q.at[1, 2, 0].set(-4000.0)  # Scaled logits up to ~4,700: exp overflows unshifted.
  weights = jnp.asarray(rng.standard_normal((b, n, heads, d)))
  got = unet.attention_in_einsums(q, k, v, 0.5)
  assert got.dtype == jnp.float64 and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, _softmax_attention(q, k, v, 0.5), rtol=1e-12,
                             atol=1e-12)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a, 0.5)) * weights)
  grads = jax.grad(loss(unet.attention_in_einsums), (0, 1, 2))(q, k, v)
  expected = jax.grad(loss(_softmax_attention), (0, 1, 2))(q, k, v)
  for got_grad, want in zip(grads, expected):
    np.testing.assert_allclose(got_grad, want, rtol=1e-10, atol=1e-12)


def test_full_attention_in_bfloat16_is_close_to_float32():
  """bfloat16 q, k, v: a bfloat16 result within its rounding of the textbook softmax
  attention run in float32 on the same (rounded) inputs."""
  rng = np.random.default_rng(2)
  as16 = [jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.bfloat16) for _ in range(3)]
  want = _softmax_attention(*(x.astype(jnp.float32) for x in as16), 8**-0.5)
  got = unet.attention_in_einsums(*as16, 8**-0.5)
  assert got.dtype == jnp.bfloat16
  # One bfloat16 rounding of p (8 bits) and of the result: ~2 x 2^-8 relative.
  np.testing.assert_allclose(np.float32(got), want, atol=1e-2, rtol=1e-2)


def test_linear_attention_in_bfloat16_is_close_to_float32():
  """bfloat16 inputs: values and gradients within bfloat16 rounding of the float32
  library grouping run on the same (rounded) inputs; the output stays bfloat16."""
  rng = np.random.default_rng(1)
  b, n, heads, d, c, f = 2, 256, 4, 8, 16, 16
  shapes = [(b, n, heads, d), (b, n, heads, d), (b, n, c), (c, heads, d), (heads, d, f),
            (2, 4, heads, d)]
  args16 = [jnp.asarray(rng.standard_normal(s) * 2, jnp.bfloat16) for s in shapes]
  args32 = [a.astype(jnp.float32) for a in args16]
  weights = jnp.asarray(rng.standard_normal((b, n, f)), jnp.float32)

  def loss(fn):
    return lambda *args: jnp.sum(fn(*args, d**-0.5).astype(jnp.float32) * weights)

  def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)

  out = unet.linear_attention(*args16, d**-0.5)
  assert out.dtype == jnp.bfloat16
  # Rounding the output alone to bfloat16 costs ~2e-3 (8 mantissa bits).
  assert rel(out, reference.as_the_library_groups_it(*args32, d**-0.5)) < 1e-2
  argnums = tuple(range(len(shapes)))
  grads = jax.grad(loss(unet.linear_attention), argnums)(*args16)
  expected = jax.grad(loss(reference.as_the_library_groups_it), argnums)(*args32)
  for got, want in zip(grads, expected):
    assert got.dtype == jnp.bfloat16 and rel(got, want) < 2e-2


def test_bfloat16_linear_attention_multiplies_its_full_size_tensors_in_bfloat16():
  """The GEMMs over all positions read bfloat16 operands, forward and backward (the
  [B, N, ...] tensors are the layer's memory traffic); only the small per-image context
  products run in float32."""
  layer = unet.LinearAttention(heads=2, dim_head=8, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 16)), jnp.float32)
  params = layer.init(jax.random.key(0), x)['params']
  loss = lambda p, x: jnp.sum(layer.apply({'params': p}, x).astype(jnp.float32) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr
  positions = (8 * 8, 2 * 8 * 8)  # N, and B * N where the kernel gradients flatten.
  over_positions = [
      eqn for eqn, _ in roofline.equations(jaxpr) if eqn.primitive.name == 'dot_general'
      and any(set(positions) & set(v.aval.shape) for v in eqn.invars)]
  # Forward: the q and k projections, exp(k)^T y, the output; backward: two per GEMM.
  assert len(over_positions) == 12
  assert all(v.aval.dtype == jnp.bfloat16
             for eqn in over_positions for v in eqn.invars), [
                 [str(v.aval) for v in eqn.invars] for eqn in over_positions]


def test_transposed_upsample_conv_matches_torch_upsample_then_conv(x64):
  """TransposedUpsampleConv (one stride-2 transposed 4x4 conv on the input) equals
  torch's nn.Upsample(nearest) then Conv2d 3x3, padding 1, in float64: values and the
  gradients of the input, kernel and bias, on an odd-sized image (borders on every side
  of both row and column parities)."""
  import torch  # pylint: disable=g-import-not-at-top  (the [torch] test extra)
  rng = np.random.default_rng(5)
  x, kernel = rng.standard_normal((2, 5, 3, 4)), rng.standard_normal((3, 3, 4, 6))
  bias, weights = rng.standard_normal(6), rng.standard_normal((2, 10, 6, 6))
  module = unet.TransposedUpsampleConv(6, dtype=jnp.float64, param_dtype=jnp.float64)

  def jax_loss(x, kernel, bias):
    out = module.apply({'params': {'kernel': kernel, 'bias': bias}}, x)
    return jnp.sum(out * weights), out

  (_, out), grads = jax.value_and_grad(jax_loss, argnums=range(3), has_aux=True)(
      jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias))
  tx, tkernel, tbias = (torch.tensor(a, requires_grad=True) for a in (x, kernel, bias))
  upsampled = torch.nn.functional.interpolate(tx.permute(0, 3, 1, 2), scale_factor=2,
                                              mode='nearest')
  expected = torch.nn.functional.conv2d(upsampled, tkernel.permute(3, 2, 0, 1), tbias,
                                        padding=1).permute(0, 2, 3, 1)
  torch.sum(expected * torch.tensor(weights)).backward()
  np.testing.assert_allclose(np.asarray(out), expected.detach().numpy(), rtol=1e-12,
                             atol=1e-12)
  for got, want in zip(grads, (tx, tkernel, tbias)):
    np.testing.assert_allclose(np.asarray(got), want.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_transposed_upsample_conv_dilates_its_input_only_in_the_forward():
  """The backward is the strided conv and its filter gradient (the custom VJP), the
  forms cuDNN runs: JAX's own rule for the kernel's gradient would be a second conv over
  the 2x input-dilated input, which XLA:GPU runs with transposes around it (~1.6 GB per
  layer at batch 256, bench/RESULTS.md)."""
  x = jnp.ones((2, 6, 5, 4), jnp.bfloat16)
  kernel = jnp.ones((4, 4, 4, 3), jnp.bfloat16)

  def loss(x, kernel):
    return jnp.sum(unet.transposed_upsample_conv(x, kernel).astype(jnp.float32) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel).jaxpr
  convs = [(eqn.params['lhs_dilation'], eqn.params['window_strides'])
           for eqn, _ in roofline.equations(jaxpr)
           if eqn.primitive.name == 'conv_general_dilated']
  dilated, strided = ((2, 2), (1, 1)), ((1, 1), (2, 2))
  # The forward, the kernel's gradient (its window dilated, its input not), the input's.
  assert convs == [dilated, ((1, 1), (1, 1)), strided], convs


def test_bfloat16_unet_inits_the_float32_params():
  """16-bit compute swaps modules (TransposedUpsampleConv for upsample + nn.Conv) but not
  params: same tree, and the same values from the same key."""
  model_kw = dict(dim=8, dim_mults=(1, 2), attn_dim_head=4, attn_heads=2)
  args = (jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32))
  float32 = jax.jit(unet.UNet(**model_kw).init)(*args)
  bfloat16 = jax.jit(unet.UNet(dtype=jnp.bfloat16, **model_kw).init)(*args)
  assert jax.tree.structure(float32) == jax.tree.structure(bfloat16)
  for a, b in zip(jax.tree.leaves(float32), jax.tree.leaves(bfloat16)):
    np.testing.assert_array_equal(a, b)


def test_upsample_nearest():
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)
  expected = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
  np.testing.assert_array_equal(np.asarray(unet.upsample_nearest(jnp.asarray(x))), expected)


def test_sinusoidal_embedding_formula():
  t = np.array([0, 7, 499])
  dim, theta = 16, 10000.0
  emb = np.asarray(unet.sinusoidal_embedding(jnp.asarray(t), dim, theta, jnp.float32))
  freqs = theta ** (-np.arange(dim // 2) / (dim // 2 - 1))
  args = t[:, None] * freqs[None, :]
  np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], -1),
                             rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_normalize():
  x = np.random.default_rng(0).standard_normal((2, 3, 3, 8)).astype(np.float32)
  module = unet.RMSNorm()
  g = np.linspace(0.5, 1.5, 8).astype(np.float32)
  out = module.apply({'params': {'g': g}}, jnp.asarray(x))
  expected = x / np.linalg.norm(x, axis=-1, keepdims=True) * g * np.sqrt(8)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_one_pass_group_statistics_keep_the_variance_under_a_large_mean():
  """float32 activations with mean 1e4 and spread 1 within each channel, 5 between
  channels (a naive one-pass variance, E[x^2] - E[x]^2, would lose it in float32): mean
  and variance per group equal float64's two passes within the float32 rounding of
  means near 1e4 (~1e-3 absolute, so 3e-4 relative on variances ~10)."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 8, 8, 32)) + 1e4 + 5 * rng.standard_normal((1, 1, 1, 32))
  mean, variance = unet.group_statistics_in_one_pass(jnp.asarray(x, jnp.float32), 8)
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64).reshape(2, 64, 8, 4)
  want_mean = x.mean(axis=(1, 3))                                  # [B, groups]
  want_variance = x.var(axis=(1, 3))
  per_channel = lambda v: np.repeat(v, 4, axis=1).reshape(2, 1, 1, 32)
  np.testing.assert_allclose(mean, per_channel(want_mean), rtol=1e-7)
  np.testing.assert_allclose(variance, per_channel(want_variance), rtol=1e-3)


@pytest.mark.parametrize('silu', [False, True])
@pytest.mark.parametrize('offset', [0.0, 1000.0])
def test_group_norm_in_bfloat16_is_within_its_rounding_of_float64(x64, offset, silu):
  """bfloat16 GroupNorm (statistics in one pass about a per-channel shift) against
  float64's two passes on the same rounded input: values and gradients within bfloat16
  rounding, also when the activations' mean (1000) dwarfs their spread (3), where
  unshifted float32 sums of squares would lose the variance. With SiLU, bfloat16 takes
  `group_norm_silu`'s hand-written backward and float64 JAX's own."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 8, 8, 32)) * 3 + offset + rng.standard_normal((1, 1, 1, 32))
  x = jnp.asarray(x, jnp.bfloat16)
  scale_shift = tuple(jnp.asarray(rng.standard_normal((2, 1, 1, 32)) * 0.3)
                      for _ in range(2))
  weights = jnp.asarray(rng.standard_normal((2, 8, 8, 32)))

  def value_and_grads(dtype):
    norm = unet.GroupNorm(8, dtype=dtype, silu=silu)
    params = norm.init(jax.random.key(0), x.astype(dtype), scale_shift)
    loss = lambda p, x: jnp.sum(norm.apply(p, x, scale_shift).astype(jnp.float64) * weights)
    return (norm.apply(params, x.astype(dtype), scale_shift),
            jax.grad(loss, argnums=(0, 1))(params, x.astype(dtype)))

  def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)

  out, grads = value_and_grads(jnp.bfloat16)
  want_out, want_grads = value_and_grads(jnp.float64)
  assert out.dtype == jnp.bfloat16
  assert rel(out, want_out) < 5e-3  # bfloat16 keeps 8 mantissa bits (~2e-3).
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert rel(got, want) < 5e-3


def test_group_norm_with_modulation_matches_torch(x64):
  """unet.GroupNorm(x, (scale, shift)) equals torch's GroupNorm then x * (scale + 1) +
  shift, in values and gradients; a mean of 300 checks the two-pass variance."""
  import torch  # pylint: disable=g-import-not-at-top  (the [torch] test extra)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 8)) * 2 + 300
  gain, bias = rng.standard_normal(8), rng.standard_normal(8)
  scale, shift = rng.standard_normal((2, 1, 1, 8)), rng.standard_normal((2, 1, 1, 8))
  weights = rng.standard_normal(x.shape)  # A loss that weighs every output differently.
  module = unet.GroupNorm(num_groups=4, dtype=jnp.float64, param_dtype=jnp.float64)

  def jax_loss(x, gain, bias, scale, shift):
    out = module.apply({'params': {'scale': gain, 'bias': bias}}, x, (scale, shift))
    return jnp.sum(out * weights), out

  (_, out), grads = jax.value_and_grad(jax_loss, argnums=range(5), has_aux=True)(
      *(jnp.asarray(a) for a in (x, gain, bias, scale, shift)))

  tx, tgain, tbias, tscale, tshift = (torch.tensor(a, requires_grad=True)
                                      for a in (x, gain, bias, scale, shift))
  normed = torch.nn.functional.group_norm(tx.permute(0, 3, 1, 2), 4, tgain, tbias, eps=1e-5)
  expected = normed.permute(0, 2, 3, 1) * (tscale + 1) + tshift
  torch.sum(expected * torch.tensor(weights)).backward()

  np.testing.assert_allclose(np.asarray(out), expected.detach().numpy(), rtol=1e-9,
                             atol=1e-9)
  for got, want in zip(grads, (tx, tgain, tbias, tscale, tshift)):
    np.testing.assert_allclose(np.asarray(got), want.grad.numpy(), rtol=1e-7, atol=1e-9)
  # In float32 a one-pass variance, E[x^2] - E[x]^2, would be off by ~1e-3 here.
  f32 = unet.GroupNorm(num_groups=4)
  out32 = f32.apply({'params': {'scale': gain.astype(np.float32),
                                'bias': bias.astype(np.float32)}},
                    jnp.asarray(x, jnp.float32),
                    (jnp.asarray(scale, jnp.float32), jnp.asarray(shift, jnp.float32)))
  np.testing.assert_allclose(np.asarray(out32), expected.detach().numpy(), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize('modulated', [True, False])
def test_group_norm_silu_backward_matches_torch(x64, modulated):
  """`group_norm_silu`'s hand-written backward (run in float64, so only its formulas
  differ) against torch's autograd of silu(group_norm(x) * (scale + 1) + shift): values
  and the gradients of x, gain, bias, scale and shift. The mean of 300 and a loss that
  weighs every output differently leave no term of the closed form untested."""
  import torch  # pylint: disable=g-import-not-at-top  (the [torch] test extra)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 3, 8)) * 2 + 300
  gain, bias = rng.uniform(0.5, 1.5, 8), rng.standard_normal(8)
  scale, shift = rng.standard_normal((2, 1, 1, 8)), rng.standard_normal((2, 1, 1, 8))
  weights = rng.standard_normal(x.shape)

  def jax_loss(x, gain, bias, scale, shift):
    scale_shift = (scale, shift) if modulated else None
    out = unet.group_norm_silu(x, gain, bias, scale_shift, 4, 1e-5)
    return jnp.sum(out * weights), out

  (_, out), grads = jax.value_and_grad(jax_loss, argnums=range(5), has_aux=True)(
      *(jnp.asarray(a) for a in (x, gain, bias, scale, shift)))

  tx, tgain, tbias, tscale, tshift = (torch.tensor(a, requires_grad=True)
                                      for a in (x, gain, bias, scale, shift))
  normed = torch.nn.functional.group_norm(tx.permute(0, 3, 1, 2), 4, tgain, tbias, eps=1e-5)
  normed = normed.permute(0, 2, 3, 1)
  if modulated:
    normed = normed * (tscale + 1) + tshift
  expected = torch.nn.functional.silu(normed)
  torch.sum(expected * torch.tensor(weights)).backward()

  np.testing.assert_allclose(np.asarray(out), expected.detach().numpy(), rtol=1e-9,
                             atol=1e-9)
  wanted = (tx, tgain, tbias) + ((tscale, tshift) if modulated else ())
  for got, want in zip(grads, wanted):
    np.testing.assert_allclose(np.asarray(got), want.grad.numpy(), rtol=1e-7, atol=1e-9)
  if not modulated:  # No modulation: nothing flows to scale and shift.
    assert not np.any(grads[3]) and not np.any(grads[4])


_TWO_DEVICE_NORM_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
import numpy as np
from eo_ddpm_jax import train_step, unet
rng = np.random.default_rng(2)
x = jnp.asarray(rng.standard_normal((4, 8, 8, 32)) * 2 + 5, jnp.bfloat16)
gain, bias = (jnp.asarray(rng.uniform(0.5, 1.5, 32), jnp.float32) for _ in range(2))
scale_shift = tuple(jnp.asarray(rng.standard_normal((4, 1, 1, 32)), jnp.bfloat16)
                    for _ in range(2))
weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
loss = lambda *a: jnp.sum(unet.group_norm_silu(*a, 8, 1e-5).astype(jnp.float32) * weights)
grads = jax.grad(loss, argnums=range(4))
alone = jax.jit(grads)(x, gain, bias, scale_shift)
mesh = train_step.make_mesh()
spec = jax.sharding.PartitionSpec
split, replicated = (jax.sharding.NamedSharding(mesh, s) for s in (spec('data'), spec()))
sharded = jax.jit(grads, in_shardings=(split, replicated, replicated, (split, split)))(
    x, gain, bias, scale_shift)
json.dump({'devices': jax.device_count(),
           'x_grad_split': sharded[0].sharding.spec[0] == 'data',
           'relative_differences': [
               float(np.abs(np.float32(a) - np.float32(b)).max() / np.abs(np.float32(a)).max())
               for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(sharded))]},
          open(sys.argv[1], 'w'))
"""


def test_group_norm_silu_split_over_two_devices_equals_one(tmp_path):
  """With the batch split over two devices (as the train step splits it), the hand-written
  backward's gradients equal one device's: x's stays split, and the gain's and bias's
  per-image sums are summed over both devices."""
  got = cli_helpers.run_script_on_cpu_devices(_TWO_DEVICE_NORM_SCRIPT, 2,
                                              tmp_path / 'out.json')
  assert got['devices'] == 2
  assert got['x_grad_split']
  assert len(got['relative_differences']) == 5  # x, gain, bias, scale, shift.
  assert max(got['relative_differences']) < 1e-5, got['relative_differences']


def _random_params(model, x, t, seed=0):
  """Random params of the right shapes without running `init`.

  Drawn in numpy: a jitted `init` spends minutes compiling its random number
  generators on a loaded 2-core CPU. Kernels get fan-in scaled normals, gains lie
  around 1 and biases around 0, so activations keep a unit scale.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)['params']

  def draw(path, s):
    name = path[-1].key
    if name == 'kernel':
      return rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))
    if name in ('scale', 'g'):
      return rng.uniform(0.5, 1.5, s.shape)
    if name == 'bias':
      return rng.uniform(-0.2, 0.2, s.shape)
    return rng.standard_normal(s.shape)  # mem_kv, as torch.randn.

  return jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(draw(p, s), jnp.float32), shapes)


@pytest.fixture(scope='module')
def tiny():
  model = unet.UNetTiny()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  t = jnp.asarray([3, 400])
  # One jitted apply shared by the tests below, so it compiles once.
  return jax.jit(model.apply), _random_params(model, x, t), x, t


def test_init_params_are_float32_for_bfloat16_compute(tiny):
  _, _, x, t = tiny
  shapes = jax.eval_shape(unet.UNetTiny(dtype=jnp.bfloat16).init, jax.random.key(0), x, t)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))


def test_output_shape_and_time_dependence(tiny):
  apply, params, x, t = tiny
  out = apply({'params': params}, jnp.concatenate([x, x]),
                             jnp.concatenate([t, t + 50]))
  assert out.shape == (4, 16, 16, 3) and out.dtype == jnp.float32
  assert float(jnp.std(out)) > 0.1
  assert float(jnp.max(jnp.abs(out[:2] - out[2:]))) > 1e-3


def test_bfloat16_compute_is_close_to_float32(tiny):
  apply, params, x, t = tiny
  reference = apply({'params': params}, jnp.concatenate([x, x]),
                                   jnp.concatenate([t, t + 50]))[:2]
  out = jax.jit(unet.UNetTiny(dtype=jnp.bfloat16).apply)({'params': params}, x, t)
  assert out.dtype == jnp.float32  # The final projection runs in float32.
  rel = jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference)
  assert float(rel) < 5e-2  # bfloat16 keeps 8 mantissa bits.


def test_self_condition_defaults_to_zeros():
  # One stage, one head: a small graph that compiles fast.
  model = unet.UNet(dim=8, dim_mults=(1,), attn_heads=1, attn_dim_head=8,
                    self_condition=True, learned_variance=True)
  x = jnp.ones((1, 8, 8, 3))
  t = jnp.asarray([10])
  params = _random_params(model, x, t)
  assert params['init_conv']['kernel'].shape == (7, 7, 6, 8)

  @jax.jit
  def both(params):
    variables = {'params': params}
    # Zeros and x as explicit conditions, batched, beside the default.
    given = model.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                        jnp.concatenate([jnp.zeros_like(x), x]))
    return model.apply(variables, x, t), given[:1], given[1:]

  default, zeros, with_x = both(params)
  assert default.shape == (1, 8, 8, 6)  # learned_variance doubles the output channels.
  np.testing.assert_allclose(default, zeros, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(with_x - zeros))) > 1e-3  # The condition is used.


def test_rejects_indivisible_size_and_bad_stage_tuples():
  with pytest.raises(ValueError, match='divisible by 2'):
    _param_shapes(unet.UNet(dim=16, dim_mults=(1, 2)), size=9)
  with pytest.raises(ValueError, match='full_attn has 3 entries'):
    _param_shapes(unet.UNet(dim=16, dim_mults=(1, 2), full_attn=(True, False, True)))
