"""The denoising U-Net: a Flax Linen port of denoising-diffusion-pytorch 1.10.12's `Unet`.

This module owns the network only. Its layers, their order and their parameter shapes
follow the library's `Unet` exactly (so parameter counts match and `torch_convert` can
load the library's weights), with two layout changes for JAX:

- images are NHWC, not NCHW;
- the pixel-unshuffle downsample stacks its 2x2 neighbours channel-minor, as
  (p1, p2, c), where the library's `Rearrange('b c (h p1) (w p2) -> b (c p1 p2) h w')`
  uses (c, p1, p2); `torch_convert` permutes the following 1x1 kernel to match.

Params are float32; `dtype` sets the compute dtype (bfloat16 on GPU/TPU). Norm statistics,
softmaxes, the linear attention (with its projections), the time embedding and the final
1x1 projection run in at least float32.

16-bit compute, the GPU's, computes two layers in a form that moves fewer bytes, with the
same params and values: GroupNorm + SiLU with a hand-written backward
(`group_norm_silu`) and the upsampling conv as one transposed conv on the input
(`TransposedUpsampleConv`). float32 keeps the plain forms, whose program was measured
against the library on CPUs.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eo_ddpm_jax import fused_linear_attention as fused_lib

Dtype = Any
# Kernels for full attention and for linear attention (see `_AttentionSettings`).
ATTENTION_IMPLS = ('einsum', 'cudnn')
LINEAR_ATTENTION_IMPLS = ('xla', 'triton', 'triton_interpret')


def _at_least_f32(dtype: Dtype) -> Dtype:
  """The dtype for statistics: float32, or float64 when computing in float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _is_16_bit(dtype: Dtype) -> bool:
  """Whether `dtype` is a 16-bit compute dtype (bfloat16, float16): the GPU's, where some
  layers take a form that moves fewer bytes (see the module docstring)."""
  return jnp.dtype(dtype).itemsize < 4


def _per_stage(value, num_stages: int, name: str) -> tuple:
  """Broadcasts a scalar to one value per stage (the library's `cast_tuple`)."""
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * num_stages
  if len(values) != num_stages:
    raise ValueError(f'UNet: {name} has {len(values)} entries but dim_mults has '
                     f'{num_stages} stages; give one per stage or a single value.')
  return values


def sinusoidal_embedding(t: jax.Array, dim: int, theta: float, dtype: Dtype) -> jax.Array:
  """Sinusoidal timestep embedding, [sin | cos] as in the library's `SinusoidalPosEmb`.

  Args:
    t: [B] timesteps, int or float (any range; usually 0..T-1).
    dim: embedding width; dim // 2 frequencies, geometric from 1 to 1/theta.
    theta: the longest wavelength's scale (10000 in the library).
    dtype: float dtype of the result.

  Returns:
    [B, 2 * (dim // 2)] in `dtype`, values in [-1, 1].
  """
  half = dim // 2
  exponent = math.log(theta) / (half - 1)
  freqs = jnp.exp(jnp.arange(half, dtype=dtype) * -exponent)
  args = jnp.asarray(t).astype(dtype)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class RMSNorm(nn.Module):
  """Channel L2 normalisation times sqrt(C) and a learned gain `g` (library `RMSNorm`).

  Matches `F.normalize(x, dim=1) * g * sqrt(C)`, i.e. x / max(||x||, eps).
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  epsilon: float = 1e-12  # F.normalize's default eps.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    g = self.param('g', nn.initializers.ones, (channels,), self.param_dtype)
    stat_dtype = _at_least_f32(self.dtype)
    xs = x.astype(stat_dtype)
    sum_sq = jnp.sum(jnp.square(xs), axis=-1, keepdims=True)
    # rsqrt(max(|x|^2, eps^2)) == 1 / max(|x|, eps); sqrt(C) undoes the mean.
    inv = jax.lax.rsqrt(jnp.maximum(sum_sq, self.epsilon**2)) * math.sqrt(channels)
    return (xs * inv * g.astype(stat_dtype)).astype(self.dtype)


@jax.custom_vjp
def _channel_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., C] @ kernel [C, F] -> [..., F]; the backward flattens x and dy to 2-D first."""
  return jnp.einsum('...c,cf->...f', x, kernel)


def _channel_matmul_fwd(x, kernel):
  return _channel_matmul(x, kernel), (x, kernel)


def _channel_matmul_bwd(residuals, dy):
  x, kernel = residuals
  dx = jnp.einsum('...f,cf->...c', dy, kernel)
  # The kernel gradient as one [N, C]^T [N, F] GEMM over N = all leading positions.
  # Autodiff gives a dot that contracts the 3 axes (B, H, W), which XLA:CPU lays out with
  # a transposed copy of dy and runs at ~10 GFLOP/s; this form measured 1.3x faster on
  # the linear attention's fwd+bwd at 64x64 and ~9% on the whole CPU train step.
  dkernel = jnp.einsum('nc,nf->cf', x.reshape(-1, x.shape[-1]),
                       dy.reshape(-1, dy.shape[-1]))
  return dx, dkernel


_channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def _pointwise_params(module: nn.Module, in_features: int, features: int,
                      use_bias: bool):
  """Makes a 1x1 convolution's params in `module`: 'kernel' [1, 1, in, features] with
  nn.Conv's initialiser and, if `use_bias`, 'bias' [features]. Returns the kernel as a
  [in, features] matrix and the bias (or None), in the module's dtype."""
  kernel = module.param('kernel', nn.linear.default_kernel_init,
                        (1, 1, in_features, features), module.param_dtype)
  bias = (module.param('bias', nn.initializers.zeros_init(), (features,),
                       module.param_dtype) if use_bias else None)
  kernel, bias = nn.dtypes.promote_dtype(kernel[0, 0], bias, dtype=module.dtype)
  return kernel, bias


class PointwiseKernel(nn.Module):
  """The params of a 1x1 convolution (as `PointwiseConv`'s), returned as a [in_features,
  features] matrix and a [features] bias (or None) in `dtype`, for layers that fold
  the matrix into other products instead of applying it to a full-size tensor."""
  in_features: int
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    return _pointwise_params(self, self.in_features, self.features, self.use_bias)


class PointwiseConv(nn.Module):
  """A 1x1 convolution computed as a matmul over the channel axis.

  Same params as `nn.Conv(features, (1, 1))` ('kernel' [1, 1, C_in, features] with the
  same initialiser, 'bias' [features]), so checkpoints and `torch_convert` are unchanged.
  Why not nn.Conv: XLA:CPU lowers the weight gradient of a 1x1 conv over a 64x64 map as
  a convolution with a 64x64 window, measured at ~4 GFLOP/s (a sixth of the CPU step);
  as a dot it is one GEMM.

  With `splits` > 1 it returns that many equal slices of the output channels, each from
  its own slice of the kernel: the same values as splitting the output, but in the
  backward pass each slice's gradient feeds its own GEMM instead of being padded and
  summed into a full-width gradient first (q/k/v: 3x the activation traffic).

  x: [..., C_in] -> [..., features], or a tuple of `splits` [..., features / splits].
  """
  features: int
  use_bias: bool = True
  splits: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel, bias = _pointwise_params(self, x.shape[-1], self.features, self.use_bias)
    x = x.astype(self.dtype)
    kernels = jnp.split(kernel, self.splits, axis=-1)
    biases = (jnp.split(bias, self.splits) if bias is not None
              else [None] * self.splits)
    outs = tuple(_channel_matmul(x, k) + (0 if b is None else b)
                 for k, b in zip(kernels, biases))
    return outs[0] if self.splits == 1 else outs


def _group_mean(channel_sums: jax.Array, num_groups: int, count: int) -> jax.Array:
  """[B, C] sums over `count` positions -> [B, 1, 1, C]: the mean over each channel's
  group."""
  b, c = channel_sums.shape
  per_group = c // num_groups
  sums = channel_sums.reshape(b, num_groups, per_group).sum(-1, keepdims=True)
  means = jnp.broadcast_to(sums / (count * per_group), (b, num_groups, per_group))
  return means.reshape(b, 1, 1, c)


def group_statistics_in_one_pass(x: jax.Array, num_groups: int):
  """GroupNorm's mean and variance [B, 1, 1, C] of x [B, H, W, C] from one read of x.

  For 16-bit compute: on GPUs that step is bound by memory traffic, and the two passes'
  second read of every normed tensor is 8.5 GB per batch-256 step (bench/RESULTS.md).
  Each channel's sums are taken about its first pixel, so the sum of squares does not
  cancel when the mean dwarfs the spread; the law of total variance then combines the
  channels of a group. float32 keeps PyTorch's two passes.
  """
  positions = x.shape[1] * x.shape[2]
  group_mean = functools.partial(_group_mean, num_groups=num_groups, count=positions)
  # The moments do not depend on the shift, so no gradient flows through it.
  shift = jax.lax.stop_gradient(x[:, 0, 0, :])           # [B, C]
  shifted = x - shift[:, None, None, :]
  sums = jnp.sum(shifted, axis=(1, 2))                   # [B, C]
  squares = jnp.sum(jnp.square(shifted), axis=(1, 2))
  channel_mean = shift + sums / positions
  mean = group_mean(channel_mean * positions)            # [B, 1, 1, C]
  spread = squares - jnp.square(sums) / positions + positions * jnp.square(
      channel_mean - mean[:, 0, 0, :])
  return mean, group_mean(spread)


def _norm_factors(x, gain, bias, scale_shift, num_groups: int, epsilon: float,
                  one_pass: bool):
  """GroupNorm, its affine and the time modulation folded into x * multiplier + offset.

  x: [B, H, W, C] in the statistics' dtype; gain, bias: [C]; scale_shift: two [B, 1, 1,
  C] or None. Returns multiplier, offset, mean and 1 / std, each [B, 1, 1, C].
  """
  h, w = x.shape[1:3]
  # Summing over H and W first, then over the group's few channels, is ~4x faster on
  # XLA:CPU than reducing over (H, W, channels of the group) at once (64x64x32, batch 13,
  # with the modulation and SiLU: forward 4.7 vs 17.9 ms, fwd+bwd 9.0 vs 26.4 ms).
  # The normalisation, affine and modulation fold into [B, 1, 1, C] factors, so the
  # full-size tensor sees a single multiply-add (and its gradient stays cheap).
  if one_pass:
    mean, variance = group_statistics_in_one_pass(x, num_groups)
  else:
    group_mean = functools.partial(_group_mean, num_groups=num_groups, count=h * w)
    mean = group_mean(jnp.sum(x, axis=(1, 2)))
    variance = group_mean(jnp.sum(jnp.square(x - mean), axis=(1, 2)))
  inverse_std = jax.lax.rsqrt(variance + epsilon)
  multiplier = inverse_std * gain
  offset = bias - mean * multiplier
  if scale_shift is not None:
    scale, shift = scale_shift
    multiplier = multiplier * (scale + 1)
    offset = offset * (scale + 1) + shift
  return multiplier, offset, mean, inverse_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def group_norm_silu(x, gain, bias, scale_shift, num_groups: int, epsilon: float):
  """silu(GroupNorm(x) * (scale + 1) + shift) for 16-bit x, with a backward in two passes.

  x: [B, H, W, C] bfloat16 or float16; gain, bias: [C] float32; scale_shift: two [B, 1,
  1, C] or None. Returns [B, H, W, C] in x's dtype: the values of `GroupNorm` (statistics
  in one pass, float32) then `nn.silu`.

  Why by hand: differentiated by JAX, XLA writes the SiLU's input gradient (full size) to
  sum it and reads it back for x's gradient; at 64x64 and below it also writes it from a
  pass of its own. Here x and the output gradient are read twice, once for the
  per-(image, channel) sums and once for x's gradient, and nothing else full-size is
  written: 5 full-size reads and writes per norm instead of 6 (128x128) or 8 (compiled
  for an H200: 294.7 -> 284.7 GB per batch-256 step, bench/RESULTS.md).
  """
  return _group_norm_silu_fwd(x, gain, bias, scale_shift, num_groups, epsilon)[0]


def _group_norm_silu_fwd(x, gain, bias, scale_shift, num_groups, epsilon):
  stat_dtype = _at_least_f32(x.dtype)
  modulation = None if scale_shift is None else tuple(
      v.astype(stat_dtype) for v in scale_shift)
  x_stat = x.astype(stat_dtype)
  multiplier, offset, mean, inverse_std = _norm_factors(
      x_stat, gain.astype(stat_dtype), bias.astype(stat_dtype), modulation, num_groups,
      epsilon, one_pass=True)
  out = nn.silu((x_stat * multiplier + offset).astype(x.dtype))
  return out, (x, gain, bias, scale_shift, multiplier, offset, mean, inverse_std)


def _group_norm_silu_bwd(num_groups, epsilon, residuals, out_grad):
  """The gradients of `group_norm_silu`: GroupNorm's closed form (x's gradient is
  1/std * (g - mean(g) - normed * mean(g * normed)) over each group, g the gradient at
  the normed value), with SiLU's derivative in x's dtype, as JAX's own backward has it."""
  del epsilon  # inverse_std includes it.
  x, gain, bias, scale_shift, multiplier, offset, mean, inverse_std = residuals
  stat_dtype = multiplier.dtype

  def normed_and_silu_grad(out_grad, x):
    """x normalised, and the loss's gradient at the SiLU's input: [B, H, W, C] each."""
    x = x.astype(stat_dtype)
    z = (x * multiplier + offset).astype(out_grad.dtype)
    sigmoid = jax.nn.sigmoid(z)
    # d silu(z) / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z))). In float32 XLA would
    # write it out rather than fuse it into the sums below (compiled for an H200).
    z_grad = out_grad * sigmoid * (1 + z * (1 - sigmoid))
    return (x - mean) * inverse_std, z_grad.astype(stat_dtype)

  # Pass 1: the per-(image, channel) sums. One reduction with two results, over W and
  # then H: in one step over H and W at 64x64 and below, XLA writes z_grad out first.
  normed, z_grad = normed_and_silu_grad(out_grad, x)
  zero = jnp.zeros((), stat_dtype)
  row_sums = jax.lax.reduce((z_grad, z_grad * normed), (zero, zero),
                            lambda a, b: (a[0] + b[0], a[1] + b[1]), (2,))
  sum_grad, sum_grad_normed = (jnp.sum(s, axis=1) for s in row_sums)  # [B, C] each
  gain32 = gain.astype(stat_dtype)
  if scale_shift is None:
    modulation = jnp.ones((), stat_dtype)
  else:
    modulation = scale_shift[0].astype(stat_dtype)[:, 0, 0, :] + 1     # [B, C]
  normed_scale = gain32 * modulation           # d z / d normed, [C] or [B, C]
  group_mean = functools.partial(_group_mean, num_groups=num_groups,
                                 count=x.shape[1] * x.shape[2])
  mean_grad = group_mean(normed_scale * sum_grad)                      # [B, 1, 1, C]
  mean_grad_normed = group_mean(normed_scale * sum_grad_normed)
  # Pass 2: x's gradient, from out_grad and x again. The barrier stops XLA from reusing
  # pass 1's z_grad, which it would write out whole to read back here.
  out_grad, x = jax.lax.optimization_barrier((out_grad, x))
  normed, z_grad = normed_and_silu_grad(out_grad, x)
  normed_scale = jnp.broadcast_to(normed_scale, sum_grad.shape)[:, None, None, :]
  x_grad = inverse_std * (z_grad * normed_scale - mean_grad - normed * mean_grad_normed)
  gain_grad = jnp.sum(modulation * sum_grad_normed, axis=0)
  bias_grad = jnp.sum(modulation * sum_grad, axis=0)
  scale_shift_grad = None
  if scale_shift is not None:
    scale_grad = gain32 * sum_grad_normed + bias.astype(stat_dtype) * sum_grad
    scale_shift_grad = tuple(g[:, None, None, :].astype(v.dtype)
                             for g, v in zip((scale_grad, sum_grad), scale_shift))
  return (x_grad.astype(x.dtype), gain_grad.astype(gain.dtype),
          bias_grad.astype(bias.dtype), scale_shift_grad)


group_norm_silu.defvjp(_group_norm_silu_fwd, _group_norm_silu_bwd)


class GroupNorm(nn.Module):
  """PyTorch's GroupNorm (two-pass variance, per-channel affine) followed by the ResNet
  block's time modulation x * (scale + 1) + shift, as one per-(image, channel)
  multiply-add, and optionally SiLU.

  x: [B, H, W, C]; scale_shift: two [B, 1, 1, C] or None -> [B, H, W, C] in `dtype`.
  Statistics in at least float32; the variance in two passes, or for 16-bit compute in
  one pass about a per-channel shift (bfloat16 activations after a conv can have a large
  mean). With `silu` and 16-bit compute, `group_norm_silu`'s hand-written backward. Params
  'scale' and 'bias' [C], as flax's GroupNorm.
  """
  num_groups: int
  epsilon: float = 1e-5  # PyTorch's default.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  silu: bool = False

  @nn.compact
  def __call__(self, x, scale_shift=None):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {c} channels do not split into {self.num_groups} '
                       'groups; choose model.resnet_block_groups dividing every width.')
    gain = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    sixteen_bit = _is_16_bit(self.dtype)
    if self.silu and sixteen_bit:
      return group_norm_silu(x.astype(self.dtype), gain, bias, scale_shift,
                             self.num_groups, self.epsilon)
    stat_dtype = _at_least_f32(self.dtype)
    if scale_shift is not None:
      scale_shift = tuple(v.astype(stat_dtype) for v in scale_shift)
    x = x.astype(stat_dtype)
    multiplier, offset, _, _ = _norm_factors(
        x, gain.astype(stat_dtype), bias.astype(stat_dtype), scale_shift,
        self.num_groups, self.epsilon, one_pass=sixteen_bit)
    out = (x * multiplier + offset).astype(self.dtype)
    return nn.silu(out) if self.silu else out


class Block(nn.Module):
  """3x3 conv -> GroupNorm -> optional (scale + 1, shift) -> SiLU.

  x: [B, H, W, C_in]; scale_shift: two [B, 1, 1, features] or None -> [B, H, W, features].
  """
  features: int
  groups: int = 8
  norm_epsilon: float = 1e-5  # PyTorch's GroupNorm default.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, scale_shift=None):
    x = nn.Conv(self.features, (3, 3), padding=1, dtype=self.dtype,
                param_dtype=self.param_dtype, name='proj')(x)
    return GroupNorm(self.groups, self.norm_epsilon, dtype=self.dtype,
                     param_dtype=self.param_dtype, silu=True, name='norm')(x, scale_shift)


class ResnetBlock(nn.Module):
  """Two `Block`s with a time-conditioned scale/shift and a residual (1x1 if needed).

  x: [B, H, W, C_in], time_emb: [B, time_dim] -> [B, H, W, features].
  """
  features: int
  groups: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, time_emb):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = nn.Dense(2 * self.features, name='mlp', **kw)(nn.silu(time_emb))
    scale, shift = jnp.split(emb[:, None, None, :], 2, axis=-1)
    h = Block(self.features, self.groups, name='block1', **kw)(x, (scale, shift))
    h = Block(self.features, self.groups, name='block2', **kw)(h)
    if x.shape[-1] != self.features:
      x = PointwiseConv(self.features, name='res_conv', **kw)(x)
    return h + x


def _split_heads(x: jax.Array, heads: int, dim_head: int) -> jax.Array:
  """[B, H, W, heads*dim_head] or [B, N, heads*dim_head] -> [B, N, heads, dim_head], N = H*W
  (the library's '(h c)')."""
  return x.reshape(x.shape[0], -1, heads, dim_head)


def _with_memory(mem_kv: jax.Array, k: jax.Array, v: jax.Array, dtype: Dtype):
  """Prepends the learned memory keys/values [2, M, heads, d] to k, v [B, N, heads, d]."""
  mem = jnp.broadcast_to(mem_kv.astype(dtype)[:, None],
                         (2, k.shape[0]) + mem_kv.shape[1:])
  return (jnp.concatenate([mem[0], k], axis=1),
          jnp.concatenate([mem[1], v], axis=1))


def linear_attention(q: jax.Array, k: jax.Array, y: jax.Array, w_v: jax.Array,
                     w_out: jax.Array, mem_kv: jax.Array, scale: float) -> jax.Array:
  """The library's linear attention and its output projection, with the value and output
  projections folded into each image's small context.

  The library computes v = y w_v, a = attention(q, k, v) and then a w_out, where
  a[n, h] = scale * softmax_d(q[n, h]) @ context[h] and context[h] [d, e] sums
  softmax_N(k)[., h]^T v[., h] over the M memory slots and N positions. Here the
  position term of context[h] is (softmax_N(k)_h^T y) w_v[h] and the result is
  softmax_d(q) (heads flattened) @ stack_h(scale * context[h] w_out[h]), the same
  products regrouped: v and `a` ([B, N, heads*d] each) are never formed, and every GEMM
  works on the [B, N, channels] layout, without heads-major transposes. XLA:CPU, one
  linear attention at 64x64x32 (4 x 32, batch 4), fwd+bwd: 84 ms against 115-130 ms
  for the library's grouping; at 128x128 on a GPU those tensors and transposes were
  half of the step's memory traffic.

  Precision: the full-size tensors (q, k, y, exp(k - max), softmax_d(q): [B, N, ...])
  stay in the inputs' dtype, so under bfloat16 they are read and written at half the
  bytes; the exponentials, the maxima, the normaliser, the GEMMs' sums and the small
  per-image context run in at least float32. In float32 and float64 every step runs in
  that dtype.

  Args:
    q, k: [B, N, heads, d].
    y: [B, N, C], the normed input that the library projects to v.
    w_v: [C, heads, d], the value projection.
    w_out: [heads, d, F], the output projection (its bias is the caller's).
    mem_kv: [2, M, heads, d] learned memory keys and values.
    scale: d ** -0.5.

  Returns:
    [B, N, F] in q's dtype.
  """
  b, n, heads, d = q.shape
  dtype = q.dtype
  stat_dtype = _at_least_f32(dtype)
  mem_k, mem_v = mem_kv[0].astype(stat_dtype), mem_kv[1].astype(stat_dtype)
  # softmax_N(k) = exp(k - max) / normaliser; the normaliser and the scale are applied
  # to the small context, and the memory slots enter as a second term, so no
  # [B, M + N, heads, d] concatenation or normalised copy of k is made.
  k_max = jax.lax.stop_gradient(jnp.maximum(
      jnp.max(k, axis=1, keepdims=True).astype(stat_dtype), jnp.max(mem_k, axis=0)))
  exp_k = jnp.exp(k.astype(stat_dtype) - k_max)  # [B, N, heads, d]
  exp_mem_k = jnp.exp(mem_k - k_max)              # [B, M, heads, d]
  normaliser = jnp.sum(exp_k, axis=1) + jnp.sum(exp_mem_k, axis=1)  # [B, heads, d]
  # A bfloat16 GEMM (its sums are float32 on GPUs) rounded once; asking it for a float32
  # result instead would make the backward multiply y by a float32 cotangent.
  keys_by_input = jnp.einsum('bnk,bnc->bkc', exp_k.astype(dtype).reshape(b, n, heads * d),
                             y).astype(stat_dtype)
  to_output = fused_lib.context_to_output(keys_by_input, exp_mem_k, normaliser,
                                         w_v.astype(stat_dtype), mem_v,
                                         w_out.astype(stat_dtype), scale)
  probs = jax.nn.softmax(q.astype(stat_dtype), axis=-1).astype(dtype)
  return jnp.einsum('bnk,bkf->bnf', probs.reshape(b, n, heads * d),
                    to_output.reshape(b, heads * d, -1).astype(dtype))


def attention_in_einsums(q: jax.Array, k: jax.Array, v: jax.Array,
                         scale: float) -> jax.Array:
  """softmax(scale * q k^T) v per head, with the logits materialised (any backend).

  The logits, their exponentials and the softmax's sums run in at least float32
  (jax.nn.dot_product_attention's XLA path forces float32 even under x64, which the
  float64 equivalence test avoids). Two regroupings of the plain form, same products:
  q, k and v go heads-major first, so both GEMMs batch over (B, heads) with nothing
  between; and each output row is divided by its softmax sum after the second GEMM
  (N x d divisions, not N x M). XLA:CPU, one 16x16 attention of the study's model
  (batch 13, 4 x 32, 260 keys, one core): forward 39 -> 8.4 ms, forward and backward
  63 -> 32 ms.

  Args:
    q: [B, N, heads, d] queries.
    k, v: [B, M, heads, d] keys and values (memory slots included).
    scale: the logits' factor, d ** -0.5.

  Returns:
    [B, N, heads, d] in q's dtype.
  """
  dtype = q.dtype
  stat_dtype = _at_least_f32(dtype)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=stat_dtype)
  # Softmax is shift-invariant: the row maximum only keeps exp in range (scale > 0).
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  exps = jnp.exp((logits - row_max) * scale)
  out = jnp.einsum('bhqk,bhkd->bhqd', exps.astype(dtype), v,
                   preferred_element_type=stat_dtype)
  out = out / jnp.sum(exps, axis=-1, keepdims=True)
  return jnp.swapaxes(out, 1, 2).astype(dtype)


class _AttentionSettings(nn.Module):
  """The settings both attentions share (library defaults).

  `impl` chooses how full attention runs: 'einsum' materialises the logits in >= float32
  (exact, any backend, the reference); 'cudnn' is jax.nn.dot_product_attention's fused
  flash kernel (NVIDIA GPUs, bfloat16/float16), which never stores the [B, heads, N, N]
  logits: at batch 256 and 32x32 tokens those are 4 GiB per layer.

  `LinearAttention` reads `impl` as one of LINEAR_ATTENTION_IMPLS: 'xla' is
  `linear_attention` (any backend); 'triton' is `fused_linear_attention`'s Pallas
  kernels (NVIDIA GPUs), which never store the [B, N, heads * d] q, k and
  exponentials, for the layers whose shapes they take (XLA for the others, and in
  float64); 'triton_interpret' runs those kernels in Pallas' interpreter (any
  backend, slow: for checking them).
  """
  heads: int = 4
  dim_head: int = 32
  num_mem_kv: int = 4
  impl: str = 'einsum'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


def _memory_and_normed_input(attn: '_AttentionSettings', x: jax.Array):
  """The shared head of both attentions: the learned memory key/values and the RMSNorm.

  Called inside `attn`'s compact __call__, so the params it makes ('mem_kv', 'norm')
  belong to `attn`. x: [B, H, W, C] -> mem_kv [2, M, heads, d] and the normed x.
  """
  mem_kv = attn.param('mem_kv', nn.initializers.normal(1.0),
                      (2, attn.num_mem_kv, attn.heads, attn.dim_head), attn.param_dtype)
  y = RMSNorm(name='norm', dtype=attn.dtype, param_dtype=attn.param_dtype)(x)
  return mem_kv, y


class LinearAttention(_AttentionSettings):
  """Linear attention (softmax over features for q, over positions for k), with
  learned memory key/values and RMSNorm before and after (library `LinearAttention`).

  Same params as the library's (via `torch_convert`): 'norm', 'to_qkv' (1x1, no bias),
  'mem_kv', 'to_out' (1x1) and 'to_out_norm'; `linear_attention` folds the value and
  output projections, so only q and k are projected.

  x: [B, H, W, C] -> [B, H, W, C] (the residual is added by the caller).
  """
  impl: str = 'xla'

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = self.heads * self.dim_head
    mem_kv, y = _memory_and_normed_input(self, x)
    y = y.reshape(b, h * w, c)
    w_qkv, _ = PointwiseKernel(c, 3 * hidden, use_bias=False, name='to_qkv', **kw)()
    w_out, bias = PointwiseKernel(hidden, c, name='to_out', **kw)()
    # Output channels (qkv, head, dim): the library's `chunk(3)`, then '(h c)'. q and k
    # as two GEMMs, so each gradient feeds its own (see PointwiseConv's splits).
    w_q, w_k, w_v = jnp.split(w_qkv, 3, axis=-1)
    w_v = w_v.reshape(c, self.heads, self.dim_head)
    w_out = w_out.reshape(self.heads, self.dim_head, c)
    scale = self.dim_head**-0.5
    if self.impl not in LINEAR_ATTENTION_IMPLS:
      raise ValueError(f'LinearAttention impl={self.impl!r} is unknown; valid values: '
                       f'{", ".join(LINEAR_ATTENTION_IMPLS)}.')
    # The fused kernels where they fit this layer's shape and dtype, else XLA.
    if (self.impl == 'xla' or self.dtype == jnp.float64
        or fused_lib.unsupported(h * w, c, self.heads, self.dim_head)):
      # The attention's full-size tensors stay in self.dtype; its statistics and small
      # context run in at least float32 (see `linear_attention`).
      q, k = (_split_heads(_channel_matmul(y, w_), self.heads, self.dim_head)
              for w_ in (w_q, w_k))
      out = linear_attention(q, k, y, w_v, w_out, mem_kv, scale)
    else:
      out = fused_lib.fused_linear_attention(y, w_q, w_k, w_v, w_out, mem_kv, scale,
                                             interpret=self.impl == 'triton_interpret')
    out = (out + bias).reshape(b, h, w, c)  # linear_attention returns self.dtype.
    return RMSNorm(name='to_out_norm', **kw)(out)


class Attention(_AttentionSettings):
  """Full softmax attention over all positions plus learned memory key/values, after
  an RMSNorm (library `Attention`, non-flash path).

  x: [B, H, W, C] -> [B, H, W, C] (the residual is added by the caller).
  """
  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = self.heads * self.dim_head
    mem_kv, y = _memory_and_normed_input(self, x)
    # Output channels (qkv, head, dim): the library's `chunk(3)`, then '(h c)'.
    qkv = PointwiseConv(3 * hidden, use_bias=False, splits=3, name='to_qkv', **kw)(y)
    q, k, v = (_split_heads(part, self.heads, self.dim_head) for part in qkv)
    k, v = _with_memory(mem_kv, k, v, self.dtype)
    scale = self.dim_head**-0.5
    if self.impl == 'cudnn':
      out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='cudnn')
    elif self.impl == 'einsum':
      out = attention_in_einsums(q, k, v, scale)
    else:
      raise ValueError(f'Attention impl={self.impl!r} is unknown; valid values: '
                       f'{", ".join(ATTENTION_IMPLS)}.')
    return PointwiseConv(c, name='to_out', **kw)(out.reshape(b, h, w, hidden))


def pixel_unshuffle(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H/2, W/2, 4C], channels ordered (p1, p2, c) (see module doc)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // 2, w // 2, 4 * c)


def upsample_nearest(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


# _UPSAMPLE_TAPS[t, k], per spatial axis: 1 where tap k of a 3x3 kernel on the 2x
# nearest-upsampled image (row offset k - 1) falls on tap t of a 4x4 stride-2 transposed
# kernel on the input. An even output row 2i reads input rows i - 1 (k=0) and i (k=1, 2);
# an odd one, 2i + 1, reads i (k=0, 1) and i + 1 (k=2).
_UPSAMPLE_TAPS = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]], np.float32)


def _stride_2_conv(y: jax.Array, kernel: jax.Array) -> jax.Array:
  """[B, 2H, 2W, F] -> [B, H, W, C]: the adjoint of `transposed_upsample_conv` in its input.

  kernel: [4, 4, C, F], the transposed conv's; here flipped, with C and F swapped."""
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  return jax.lax.conv_general_dilated(y, flipped, window_strides=(2, 2),
                                      padding=((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@jax.custom_vjp
def transposed_upsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, F]: the stride-2 transposed conv with `kernel` [4, 4, C, F].

  Defined as the transpose of `_stride_2_conv`, the form XLA hands to cuDNN as one
  backward-data convolution (an input-dilated conv written out directly is run as a
  forward conv over the 4x dilated, zero-filled input)."""
  b, h, w, _ = x.shape
  output = jax.ShapeDtypeStruct((b, 2 * h, 2 * w, kernel.shape[3]), x.dtype)
  return jax.linear_transpose(lambda y: _stride_2_conv(y, kernel), output)(x)[0]


def _transposed_upsample_conv_fwd(x, kernel):
  return transposed_upsample_conv(x, kernel), (x, kernel)


def _transposed_upsample_conv_bwd(residuals, grad):
  # JAX's own rule for the kernel of an input-dilated conv is a conv with an [H, W]
  # window that XLA:GPU does not give to cuDNN's filter-gradient kernel (it adds ~1.6 GB
  # of transposes per layer at batch 256); the same value as the filter gradient of the
  # strided conv does map to it.
  x, kernel = residuals
  kernel_shape = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
  kernel_grad = jax.linear_transpose(lambda k: _stride_2_conv(grad, k), kernel_shape)(x)[0]
  return _stride_2_conv(grad, kernel), kernel_grad


transposed_upsample_conv.defvjp(_transposed_upsample_conv_fwd,
                                _transposed_upsample_conv_bwd)


class TransposedUpsampleConv(nn.Module):
  """2x nearest upsampling then a 3x3 conv (the library's `Upsample`), as one stride-2
  transposed 4x4 conv on the input. Each output pixel's 3x3 window on the upsampled
  image covers 2x2 input pixels, so the 4x4 kernel sums the taps that land on the same
  one: 16 multiply-adds per input pixel and channel pair where the upsample-then-conv
  does 36, the 4x upsampled tensor is never written, and cuDNN gives the output and
  both gradients in place (no depth-to-space).

  x: [B, H, W, C] -> [B, 2H, 2W, features]. Params 'kernel' [3, 3, C, features] and
  'bias' [features], as nn.Conv's (so `torch_convert` and init are unchanged).
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (3, 3, c, self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    taps = jnp.asarray(_UPSAMPLE_TAPS, kernel.dtype)
    transposed = jnp.einsum('tk,sl,klio->tsio', taps, taps, kernel)
    y = transposed_upsample_conv(x.astype(self.dtype), transposed.astype(self.dtype))
    return y + bias.astype(self.dtype)


class UNet(nn.Module):
  """The library's `Unet` (1.10.12) in NHWC.

  Attributes:
    dim: base width; stage i has dim * dim_mults[i] channels; time embedding 4 * dim.
    dim_mults: per-stage width multipliers; H, W must be divisible by
      2 ** (len(dim_mults) - 1).
    channels: image channels.
    init_dim: width of the 7x7 stem (default dim).
    out_dim: output channels (default channels, doubled when learned_variance).
    self_condition: feed a previous x0 estimate as extra input channels.
    resnet_block_groups: GroupNorm groups.
    learned_variance: doubles the default out_dim.
    sinusoidal_pos_emb_theta: time embedding's wavelength scale.
    attn_heads, attn_dim_head: int, or one per stage (the middle uses the last).
    full_attn: one bool per stage (True: full attention, False: linear), or True for
      all stages; None, () or False give the library's default: full attention in
      the innermost stage only (the middle always uses full attention).
    num_mem_kv: learned memory key/values per attention layer (fixed 4 in the library).
    attention_impl: full attention's kernel, 'einsum' or 'cudnn' (see
      `_AttentionSettings`); the outputs agree to the compute dtype's rounding.
    linear_attention_impl: linear attention's kernels, one of LINEAR_ATTENTION_IMPLS
      (see `_AttentionSettings`); likewise.
    dtype: compute dtype; params are `param_dtype` (float32).
  """
  dim: int
  dim_mults: Sequence[int] = (1, 2, 4, 8)
  channels: int = 3
  init_dim: int | None = None
  out_dim: int | None = None
  self_condition: bool = False
  resnet_block_groups: int = 8
  learned_variance: bool = False
  sinusoidal_pos_emb_theta: float = 10000.0
  attn_heads: int | Sequence[int] = 4
  attn_dim_head: int | Sequence[int] = 32
  full_attn: bool | Sequence[bool] | None = None
  num_mem_kv: int = 4
  attention_impl: str = 'einsum'
  linear_attention_impl: str = 'xla'
  time_dim_mult: int = 4  # Time embedding width is dim * time_dim_mult.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.dim_mults) - 1)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array,
               x_self_cond: jax.Array | None = None) -> jax.Array:
    """Predicts the network target (noise, x0 or v) for noisy images.

    Args:
      x: [B, H, W, channels] float images, usually in [-1, 1].
      t: [B] int or float timesteps.
      x_self_cond: [B, H, W, channels] or None (zeros); used when self_condition.

    Returns:
      [B, H, W, out_dim], float32 (float64 when dtype is float64).
    """
    num_stages = len(self.dim_mults)
    if x.ndim != 4 or any(s % self.downsample_factor for s in x.shape[1:3]):
      raise ValueError(f'UNet: input of shape {x.shape} must be [B, H, W, C] with H and '
                       f'W divisible by {self.downsample_factor} for dim_mults '
                       f'{self.dim_mults}.')
    full_attn = self.full_attn
    if not full_attn:
      full_attn = (False,) * (num_stages - 1) + (True,)
    full_attn = _per_stage(full_attn, num_stages, 'full_attn')
    heads = _per_stage(self.attn_heads, num_stages, 'attn_heads')
    dim_heads = _per_stage(self.attn_dim_head, num_stages, 'attn_dim_head')

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init_dim = self.init_dim or self.dim
    dims = [init_dim] + [self.dim * m for m in self.dim_mults]
    in_out = list(zip(dims[:-1], dims[1:]))
    resnet = functools.partial(ResnetBlock, groups=self.resnet_block_groups, **kw)

    def attention(stage, name):
      if full_attn[stage]:
        return Attention(heads[stage], dim_heads[stage], self.num_mem_kv,
                         self.attention_impl, name=name, **kw)
      return LinearAttention(heads[stage], dim_heads[stage], self.num_mem_kv,
                             self.linear_attention_impl, name=name, **kw)

    if self.self_condition:
      if x_self_cond is None:
        x_self_cond = jnp.zeros_like(x)
      x = jnp.concatenate([x_self_cond, x], axis=-1)
    x = nn.Conv(init_dim, (7, 7), padding=3, name='init_conv', **kw)(x.astype(self.dtype))
    r = x

    time_dim = self.dim * self.time_dim_mult
    temb = sinusoidal_embedding(t, self.dim, self.sinusoidal_pos_emb_theta,
                                _at_least_f32(self.dtype))
    temb = nn.Dense(time_dim, name='time_mlp_1', **kw)(temb)
    temb = nn.gelu(temb, approximate=False)  # torch.nn.GELU's default is exact.
    temb = nn.Dense(time_dim, name='time_mlp_2', **kw)(temb)

    skips = []
    for i, (dim_in, dim_out) in enumerate(in_out):
      x = resnet(dim_in, name=f'downs_{i}_block1')(x, temb)
      skips.append(x)
      x = resnet(dim_in, name=f'downs_{i}_block2')(x, temb)
      x = attention(i, f'downs_{i}_attn')(x) + x
      skips.append(x)
      if i < num_stages - 1:
        x = PointwiseConv(dim_out, name=f'downs_{i}_downsample', **kw)(pixel_unshuffle(x))
      else:
        x = nn.Conv(dim_out, (3, 3), padding=1, name=f'downs_{i}_downsample', **kw)(x)

    x = resnet(dims[-1], name='mid_block1')(x, temb)
    x = Attention(heads[-1], dim_heads[-1], self.num_mem_kv, self.attention_impl,
                  name='mid_attn', **kw)(x) + x
    x = resnet(dims[-1], name='mid_block2')(x, temb)

    for j, (dim_in, dim_out) in enumerate(reversed(in_out)):
      stage = num_stages - 1 - j
      for block in ('block1', 'block2'):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = resnet(dim_out, name=f'ups_{j}_{block}')(x, temb)
      x = attention(stage, f'ups_{j}_attn')(x) + x
      name = f'ups_{j}_upsample'
      if j == num_stages - 1:
        x = nn.Conv(dim_in, (3, 3), padding=1, name=name, **kw)(x)
      elif _is_16_bit(self.dtype):
        x = TransposedUpsampleConv(dim_in, name=name, **kw)(x)
      else:  # float32 keeps the program measured against the library on CPUs.
        x = nn.Conv(dim_in, (3, 3), padding=1, name=name, **kw)(upsample_nearest(x))

    x = resnet(self.dim, name='final_res_block')(jnp.concatenate([x, r], -1), temb)
    out_dim = self.out_dim or self.channels * (2 if self.learned_variance else 1)
    # The last 1x1 projection is tiny; running it in >= float32 gives the loss a
    # full-precision prediction.
    out_dtype = _at_least_f32(self.dtype)
    return PointwiseConv(out_dim, name='final_conv', dtype=out_dtype,
                         param_dtype=self.param_dtype)(x)


# Presets. The study trained dim=64, dim_mults=(1, 2, 4) (9,908,483 params);
# the library's default is (1, 2, 4, 8) (35,719,555 params).
UNetStudy = functools.partial(UNet, dim=64, dim_mults=(1, 2, 4))
UNetLibraryDefault = functools.partial(UNet, dim=64, dim_mults=(1, 2, 4, 8))
# Tiny network for tests and CPU demos (242,483 params).
UNetTiny = functools.partial(UNet, dim=16, dim_mults=(1, 2))
