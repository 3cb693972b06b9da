"""The linear attention as fused GPU kernels (Pallas on Triton), for bfloat16 at scale.

`unet.linear_attention` runs as ~14 XLA kernels that write and re-read q, k, exp(k - max)
and softmax_d(q), each [B, N, heads * d]: at 128x128 and batch 256 that is ~17 GB per
layer forward (bench/RESULTS.md). Here the same products run as two passes over the
normed input y [B, N, C], each recomputing q or k from y in registers:

1. `_key_statistics`: per chunk of positions, the running max over positions of
   k = y w_k, the normaliser sum(exp(k - max)) and sum(exp(k - max)^T y) [heads*d, C]
   (flash attention's online rescaling, one program per image and chunk);
2. plain JAX merges the chunks and the memory slots into each image's small
   `to_output` [heads*d, F] (as `unet.linear_attention` does);
3. `_apply_context`: softmax_d(y w_q) @ to_output, one program per image and chunk.

Each has a hand-written backward that again recomputes q or k from y, so no [B, N,
heads*d] tensor is ever stored. One 128x128 layer at batch 256, forward and backward,
moves 8.6 GB against 35.9 GB in XLA (compiled for an H100, bench/RESULTS.md); on an
H200 it ran in 3.4 ms against XLA's 8.9 ms (the 8.6 GB alone take ~2.0 ms at the 4.3
TB/s a copy reaches there), and the batch-256 train step peaked at 28.8 GiB (40.4 with
XLA's version, at an earlier commit). bench/kernel_sass.py counts their registers,
occupancy and instructions without a GPU.

The numbers follow `unet.linear_attention`'s precision: q and k are rounded to y's dtype
before their softmaxes, the exponentials and GEMM operands are in y's dtype, and the
statistics, sums and accumulators are float32. Where that version rounds the per-image
sum exp(k)^T y to y's dtype once, this keeps it in float32.

Shapes must suit Triton and the GPU's shared memory (`unsupported` says why not; the
U-Net then uses `unet.linear_attention` for that layer). `interpret=True` runs the same
kernels through Pallas' interpreter on any backend (the tests check them there).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# Positions per program (a grid step): 1024 give 4096 programs at 128x128 and batch 256
# (the H100 and H200 have 132 SMs).
CHUNK = 1024
MAX_CHANNELS = 128


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How one kernel walks its chunk of positions.

  block_elements: rows per loop step times the layer's width (the wider of input and
    output), so wider layers take fewer rows (at most the chunk). Shared memory bounds
    it: each card's defaults (`tilings`) compile for it (bench/gpu_compile.py); the
    first version of these kernels, at 64 rows of 128 channels, asked an H100 for 248
    KiB (it has 227 per block). bench/linear_attention_kernels.py times the
    alternatives on a GPU.
  num_warps: Triton warps per program.
  num_stages: Triton's software-pipelining stages for the loop (None: its default).
  """
  block_elements: int
  num_warps: int
  num_stages: int | None = None


# Per kernel, for Hopper (the H100 and H200, 227 KiB of shared memory per block): each
# kernel's fastest tiling at the study's layers on an H200 (bench/gpu_tilings.sh); they
# took the batch-256 bfloat16 step from 147.6 to 142.0 ms (bench/RESULTS.md).
TILINGS = {
    'key_statistics': Tiling(2048, 4),
    'key_statistics_grad': Tiling(4096, 4),
    'apply_context': Tiling(8192, 4),
    'apply_context_grad': Tiling(8192, 8),
}
# For the A100 (compute capability 8.0, 163 KiB per block), where TILINGS' two backward
# kernels ask for up to 192 KiB at 128 channels: the earlier defaults, which compile for
# it (bench/gpu_compile.py --card A100); not timed on one.
A100_TILINGS = {
    'key_statistics': Tiling(4096, 4),
    'key_statistics_grad': Tiling(4096, 8),
    'apply_context': Tiling(4096, 4),
    'apply_context_grad': Tiling(2048, 8),
}
# The GPU the kernels are compiled for, as a compute capability ('9.0'); None: JAX's
# first device's. The deviceless benchmarks set it to compile for a described card.
TARGET_COMPUTE_CAPABILITY = None
# The mesh axis that splits the batch (train_step.make_mesh's).
BATCH_AXIS = 'data'
_LOG2_E = math.log2(math.e)


def _dot(a, b, contract=(1, 0)):
  """a @ b with float32 accumulation; contract=(0, 0) is a^T b, (1, 1) is a b^T."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _exp_minus(x, shift):
  """exp(x - shift) in float32 as one multiply-add and the GPU's exp2 instruction
  (jnp.exp's accurate libdevice call adds a range reduction per element). The rounding
  of x * log2(e) and shift * log2(e) costs a relative error of ~1e-7 * |shift|."""
  return jnp.exp2(x * _LOG2_E - shift * _LOG2_E)


def _round(x, dtype):
  """x rounded to `dtype` and back to float32 (as the XLA version stores q and k)."""
  return x.astype(dtype).astype(jnp.float32)


def tilings() -> dict[str, Tiling]:
  """The tilings the kernels use on the target GPU: A100_TILINGS for compute capability
  8.x, else TILINGS (Hopper's, also off GPUs: the interpreter). The table itself, not a
  copy: benchmarks replace its entries to time others."""
  capability = TARGET_COMPUTE_CAPABILITY or getattr(jax.devices()[0],
                                                    'compute_capability', '')
  return A100_TILINGS if str(capability).startswith('8.') else TILINGS


def _layout(n: int, chunk: int | None, width: int, tiling: Tiling):
  """(chunk, rows per loop step, number of chunks) for n positions of `width` channels
  (the wider of input and output)."""
  chunk = min(chunk or CHUNK, n)
  # gcd: the rows must split the chunk (powers of two here, see `unsupported`).
  block = math.gcd(chunk, max(16, tiling.block_elements // width))
  if n % chunk or block < 16:
    raise ValueError(f'fused linear attention: {n} positions do not split into chunks of '
                     f'{chunk} and loop steps of 16 rows or more.')
  return chunk, block, n // chunk


def unsupported(n: int, c: int, heads: int, d: int) -> str:
  """Why these kernels cannot run a layer of n positions, c channels in and out and
  heads x d, or '' when they can.

  Triton wants powers of two from 16; layers wider than MAX_CHANNELS ask an H100 for
  more shared memory than it has (found by compiling for it, bench/gpu_compile.py).
  """
  for name, value in (('channels', c), ('heads * dim_head', heads * d), ('dim_head', d)):
    if value < 16 or value & (value - 1) or value > MAX_CHANNELS:
      return f'{name}={value} is not a power of two from 16 to {MAX_CHANNELS}'
  if n % min(CHUNK, n) or n % 64:
    return f'{n} positions are not a multiple of 64'
  return ''


def _per_batch_shard(fn, batched_inputs):
  """fn run on each device's share of the batch, when tracing under a mesh (see
  train_step.with_mesh) that splits the batch over BATCH_AXIS; else fn itself.

  A Pallas call is opaque to XLA's partitioner, which would gather the whole batch onto
  every device and run it there. Every program here works on one image, so each device
  runs the kernels on its own images; the weights' gradients are summed over devices
  by shard_map's transpose.

  Args:
    fn: takes arrays; its outputs all have the batch as their leading axis.
    batched_inputs: for each input, whether its leading axis is the batch.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or BATCH_AXIS not in mesh.axis_names or mesh.shape[BATCH_AXIS] == 1:
    return fn
  spec = jax.sharding.PartitionSpec
  return jax.shard_map(fn, mesh=mesh, out_specs=spec(BATCH_AXIS), check_vma=False,
                       in_specs=tuple(spec(BATCH_AXIS) if b else spec()
                                      for b in batched_inputs))


def _grid(batch: int, chunks: int) -> tuple[int, int]:
  """The programs, (chunk, image) with the chunk first: CUDA launches the first grid
  axis fastest, so programs that run at once read neighbouring chunks of a few images.
  In (image, chunk) order they read the same offset of ~132 images, addresses 2 MiB
  apart at 128x128x64 in bfloat16; a power-of-two stride like that can crowd a few of
  the GPU's memory channels (a suspicion, not yet timed: bench/RESULTS.md)."""
  return chunks, batch


def _call(kernel, out_shape, grid, in_specs, out_specs, interpret, tiling: Tiling):
  params = plt.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      interpret=interpret, compiler_params=params)


def _rows(chunk, width):
  """BlockSpec of one image's chunk of positions of an array [B, N, width]."""
  return pl.BlockSpec((None, chunk, width), lambda s, b: (b, s, 0))


def _per_image_chunk(shape):
  """BlockSpec of one image's chunk of an array [B, S, *shape] (its own output slot)."""
  return pl.BlockSpec((None, None) + shape, lambda s, b: (b, s) + (0,) * len(shape))


def _per_image(shape):
  """BlockSpec of one image's whole entry of an array [B, *shape]."""
  return pl.BlockSpec((None,) + shape, lambda s, b: (b,) + (0,) * len(shape))


def _whole(shape):
  """BlockSpec of a weight every program reads whole."""
  return pl.BlockSpec(shape, lambda s, b: (0,) * len(shape))


# --- Pass 1: the keys' statistics over positions. -------------------------------------

def _key_statistics_kernel(y_ref, w_k_ref, max_ref, sum_ref, weighted_ref, *, block):
  """One image's chunk: max_n k, sum_n exp(k - max) and sum_n exp(k - max)^T y."""
  dtype = y_ref.dtype
  w_k = w_k_ref[...]
  hidden, c = weighted_ref.shape

  def step(i, carry):
    k_max, total, weighted = carry
    y = y_ref[pl.ds(i * block, block), :]                 # [block, C]
    k = _round(_dot(y, w_k), dtype)                        # [block, hidden]
    new_max = jnp.maximum(k_max, jnp.max(k, axis=0))
    rescale = _exp_minus(k_max, new_max)
    exp_k = _exp_minus(k, new_max[None, :])
    total = total * rescale + jnp.sum(exp_k, axis=0)
    weighted = weighted * rescale[:, None] + _dot(exp_k.astype(dtype), y, (0, 0))
    return new_max, total, weighted

  init = (jnp.full((hidden,), -jnp.inf, jnp.float32), jnp.zeros((hidden,), jnp.float32),
          jnp.zeros((hidden, c), jnp.float32))
  k_max, total, weighted = jax.lax.fori_loop(0, y_ref.shape[0] // block, step, init)
  max_ref[...] = k_max
  sum_ref[...] = total
  weighted_ref[...] = weighted


def _key_statistics_grad_kernel(y_ref, w_k_ref, max_ref, d_sum_ref, d_weighted_ref,
                                dy_ref, d_w_k_ref, *, block):
  """The gradient of (sum, weighted) for fixed maxima: dy for the chunk, d w_k partial."""
  dtype = y_ref.dtype
  w_k = w_k_ref[...]
  k_max, d_sum = max_ref[...], d_sum_ref[...]
  d_weighted = d_weighted_ref[...].astype(dtype)          # [hidden, C]

  # With e = exp(k - max): sum = sum_n e_n and weighted = sum_n e_n^T y_n, so
  # de = d_sum + y d_weighted^T and dk = e * de; y gets d_weighted's share through
  # e^T y and dk's through k = y w_k.
  def step(i, d_w_k):
    rows = pl.ds(i * block, block)
    y = y_ref[rows, :]
    exp_k = _exp_minus(_round(_dot(y, w_k), dtype), k_max[None, :])
    d_exp = d_sum[None, :] + _dot(y, d_weighted, (1, 1))  # [block, hidden]
    d_k = (exp_k * d_exp).astype(dtype)
    dy = _dot(exp_k.astype(dtype), d_weighted) + _dot(d_k, w_k, (1, 1))
    dy_ref[rows, :] = dy.astype(dtype)
    return d_w_k + _dot(y, d_k, (0, 0))

  d_w_k_ref[...] = jax.lax.fori_loop(0, y_ref.shape[0] // block, step,
                                     jnp.zeros(d_w_k_ref.shape, jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _key_statistics(y, w_k, chunk, interpret):
  """Per image and chunk of positions: k's max [B, S, hidden], sum(exp(k - max)) [B, S,
  hidden] and sum(exp(k - max)^T y) [B, S, hidden, C], all float32, k = y w_k.

  The maxima carry no gradient: they only shift the exponentials, which the caller's
  merge undoes exactly, so the gradient for fixed maxima is the true one.
  """
  return _key_statistics_fwd(y, w_k, chunk, interpret)[0]


def _key_statistics_fwd(y, w_k, chunk, interpret):
  b, n, c = y.shape
  hidden = w_k.shape[1]
  tiling = tilings()['key_statistics']
  chunk, block, chunks = _layout(n, chunk, c, tiling)
  f32 = jnp.float32
  outputs = _call(
      functools.partial(_key_statistics_kernel, block=block),
      out_shape=(jax.ShapeDtypeStruct((b, chunks, hidden), f32),
                 jax.ShapeDtypeStruct((b, chunks, hidden), f32),
                 jax.ShapeDtypeStruct((b, chunks, hidden, c), f32)),
      grid=_grid(b, chunks),
      in_specs=[_rows(chunk, c), _whole((c, hidden))],
      out_specs=(_per_image_chunk((hidden,)), _per_image_chunk((hidden,)),
                 _per_image_chunk((hidden, c))),
      interpret=interpret, tiling=tiling)(y, w_k)
  return outputs, (y, w_k, outputs[0])


def _key_statistics_bwd(chunk, interpret, residuals, cotangents):
  y, w_k, k_max = residuals
  _, d_sum, d_weighted = cotangents  # The maxima's cotangent is ignored (see above).
  b, n, c = y.shape
  hidden = w_k.shape[1]
  tiling = tilings()['key_statistics_grad']
  chunk, block, chunks = _layout(n, chunk, c, tiling)
  dy, d_w_k = _call(
      functools.partial(_key_statistics_grad_kernel, block=block),
      out_shape=(jax.ShapeDtypeStruct(y.shape, y.dtype),
                 jax.ShapeDtypeStruct((b, chunks, c, hidden), jnp.float32)),
      grid=_grid(b, chunks),
      in_specs=[_rows(chunk, c), _whole((c, hidden)),
                _per_image_chunk((hidden,)), _per_image_chunk((hidden,)),
                _per_image_chunk((hidden, c))],
      out_specs=(_rows(chunk, c),
                 _per_image_chunk((c, hidden))),
      interpret=interpret, tiling=tiling)(y, w_k, k_max, d_sum, d_weighted)
  return dy, d_w_k.sum(axis=(0, 1)).astype(w_k.dtype)


_key_statistics.defvjp(_key_statistics_fwd, _key_statistics_bwd)


# --- Pass 2: each position's softmax_d(q) applied to its image's context. -------------

def _head_sum(x, dim_head):
  """Each row's sum over each head's dim_head columns of x [rows, heads * d], broadcast
  back over that head's columns.

  The reshape to one row per (position, head) lets Triton reduce within each head; the
  first version masked the columns head by head, and its backward kernel ran ~1.6x the
  instructions (SASS compiled for an H200, bench/RESULTS.md).
  """
  rows, width = x.shape
  by_head = x.reshape(rows * width // dim_head, dim_head)
  return jnp.broadcast_to(jnp.sum(by_head, axis=1, keepdims=True),
                          by_head.shape).reshape(rows, width)


def _softmax_per_head(q, dim_head):
  """softmax over each head's dim_head columns of q [rows, heads * d], float32."""
  rows, width = q.shape
  by_head = q.reshape(rows * width // dim_head, dim_head)
  exp_q = _exp_minus(by_head, jnp.max(by_head, axis=1, keepdims=True))
  # One reciprocal per (position, head), not a float32 divide (several instructions) per
  # element.
  return (exp_q * (1.0 / jnp.sum(exp_q, axis=1, keepdims=True))).reshape(rows, width)


def _apply_context_kernel(y_ref, w_q_ref, to_output_ref, out_ref, *, block, dim_head):
  """One image's chunk: out = softmax_d(y w_q) @ to_output, all heads in one GEMM (the
  heads' rows of to_output are stacked, so the sum over heads is the product's)."""
  dtype = y_ref.dtype
  w_q, to_output = w_q_ref[...], to_output_ref[...]

  def step(i, _):
    rows = pl.ds(i * block, block)
    probs = _softmax_per_head(_round(_dot(y_ref[rows, :], w_q), dtype), dim_head)
    out_ref[rows, :] = _dot(probs.astype(dtype), to_output).astype(dtype)
    return 0

  jax.lax.fori_loop(0, y_ref.shape[0] // block, step, 0)


def _apply_context_grad_kernel(y_ref, w_q_ref, to_output_ref, d_out_ref,
                               dy_ref, d_w_q_ref, d_to_output_ref, *, block, dim_head):
  """The gradient of `_apply_context_kernel`: dy for the chunk, d w_q and d to_output
  partials."""
  dtype = y_ref.dtype
  w_q, to_output = w_q_ref[...], to_output_ref[...]

  def step(i, carry):
    d_w_q, d_to_output = carry
    rows = pl.ds(i * block, block)
    y, d_out = y_ref[rows, :], d_out_ref[rows, :]
    probs = _softmax_per_head(_round(_dot(y, w_q), dtype), dim_head)   # [block, hidden]
    d_probs = _dot(d_out, to_output, (1, 1))
    # softmax's backward, per head: d_q = p * (d_p - sum_head(p * d_p)).
    d_q = probs * (d_probs - _head_sum(probs * d_probs, dim_head))
    d_q = d_q.astype(dtype)
    dy_ref[rows, :] = _dot(d_q, w_q, (1, 1)).astype(dtype)
    return (d_w_q + _dot(y, d_q, (0, 0)),
            d_to_output + _dot(probs.astype(dtype), d_out, (0, 0)))

  init = (jnp.zeros(d_w_q_ref.shape, jnp.float32),
          jnp.zeros(d_to_output_ref.shape, jnp.float32))
  d_w_q, d_to_output = jax.lax.fori_loop(0, y_ref.shape[0] // block, step, init)
  d_w_q_ref[...] = d_w_q
  d_to_output_ref[...] = d_to_output


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _apply_context(y, w_q, to_output, dim_head, chunk, interpret):
  """[B, N, C] -> [B, N, F]: softmax over each head's d of y w_q, times each image's
  to_output [B, hidden, F] (in y's dtype), summed over heads."""
  return _apply_context_fwd(y, w_q, to_output, dim_head, chunk, interpret)[0]


def _apply_context_fwd(y, w_q, to_output, dim_head, chunk, interpret):
  b, n, c = y.shape
  hidden, f = to_output.shape[1:]
  tiling = tilings()['apply_context']
  chunk, block, chunks = _layout(n, chunk, max(c, f), tiling)
  out = _call(
      functools.partial(_apply_context_kernel, block=block, dim_head=dim_head),
      out_shape=jax.ShapeDtypeStruct((b, n, f), y.dtype),
      grid=_grid(b, chunks),
      in_specs=[_rows(chunk, c), _whole((c, hidden)),
                _per_image((hidden, f))],
      out_specs=_rows(chunk, f),
      interpret=interpret, tiling=tiling)(y, w_q, to_output)
  return out, (y, w_q, to_output)


def _apply_context_bwd(dim_head, chunk, interpret, residuals, d_out):
  y, w_q, to_output = residuals
  b, n, c = y.shape
  hidden, f = to_output.shape[1:]
  tiling = tilings()['apply_context_grad']
  chunk, block, chunks = _layout(n, chunk, max(c, f), tiling)
  dy, d_w_q, d_to_output = _call(
      functools.partial(_apply_context_grad_kernel, block=block, dim_head=dim_head),
      out_shape=(jax.ShapeDtypeStruct(y.shape, y.dtype),
                 jax.ShapeDtypeStruct((b, chunks, c, hidden), jnp.float32),
                 jax.ShapeDtypeStruct((b, chunks, hidden, f), jnp.float32)),
      grid=_grid(b, chunks),
      in_specs=[_rows(chunk, c), _whole((c, hidden)),
                _per_image((hidden, f)),
                _rows(chunk, f)],
      out_specs=(_rows(chunk, c),
                 _per_image_chunk((c, hidden)), _per_image_chunk((hidden, f))),
      interpret=interpret, tiling=tiling)(y, w_q, to_output, d_out.astype(y.dtype))
  return (dy, d_w_q.sum(axis=(0, 1)).astype(w_q.dtype),
          d_to_output.sum(axis=1).astype(to_output.dtype))


_apply_context.defvjp(_apply_context_fwd, _apply_context_bwd)


def context_to_output(keys_by_input, exp_mem_k, normaliser, w_v, mem_v, w_out, scale):
  """Each image's map from softmax_d(q) to the output: scale * context[h] @ w_out[h],
  with context[h] = (sum_n exp(k - max)^T y) w_v[h] plus the memory slots' term, over
  the normaliser. Shared by `unet.linear_attention` and the kernels (all small).

  Args:
    keys_by_input: [B, heads * d, C], sum over positions of exp(k - max)^T y.
    exp_mem_k: [B, M, heads, d], exp(memory keys - max).
    normaliser: [B, heads, d], the keys' softmax denominators.
    w_v: [C, heads, d]; mem_v: [M, heads, d]; w_out: [heads, d, F].
    scale: d ** -0.5.

  Returns:
    [B, heads, d, F].
  """
  b, heads, d = normaliser.shape
  context = (jnp.einsum('bhdc,che->bhde', keys_by_input.reshape(b, heads, d, -1), w_v)
             + jnp.einsum('bmhd,mhe->bhde', exp_mem_k, mem_v))   # [B, heads, d, e]
  context = context * (scale / normaliser)[..., None]
  return jnp.einsum('bhde,hef->bhdf', context, w_out)


def fused_linear_attention(y: jax.Array, w_q: jax.Array, w_k: jax.Array, w_v: jax.Array,
                           w_out: jax.Array, mem_kv: jax.Array, scale: float, *,
                           chunk: int | None = None, interpret: bool = False) -> jax.Array:
  """`unet.linear_attention` with its q and k projections, as fused kernels.

  Args:
    y: [B, N, C], the normed input, in the compute dtype.
    w_q, w_k: [C, heads * d] query and key projections (heads-major columns).
    w_v: [C, heads, d], the value projection.
    w_out: [heads, d, F], the output projection (its bias is the caller's).
    mem_kv: [2, M, heads, d] learned memory keys and values.
    scale: d ** -0.5.
    chunk: positions per program (default CHUNK, at most N).
    interpret: run the kernels in Pallas' interpreter (any backend; slow).

  Returns:
    [B, N, F] in y's dtype: softmax_d(q) @ (scale * context @ w_out) per head, summed,
    with context over the M memory slots and the N positions (see
    `unet.linear_attention`).
  """
  b, n, c = y.shape
  heads, d = w_v.shape[1:]
  f = w_out.shape[-1]
  reason = unsupported(n, max(c, f), heads, d)
  if reason:
    raise ValueError(f'fused linear attention: {reason}; use unet.linear_attention.')
  if y.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f'fused linear attention: y is {y.dtype}; its sums are float32, so it '
                     'takes float32, bfloat16 or float16.')
  dtype = y.dtype
  w_q, w_k = w_q.astype(dtype), w_k.astype(dtype)
  key_statistics = functools.partial(_key_statistics, chunk=chunk, interpret=interpret)
  chunk_max, chunk_sum, chunk_weighted = _per_batch_shard(key_statistics, (True, False))(
      y, w_k)
  # Merge the chunks and the memory slots under one max per image (flash attention's
  # rescaling); everything here is per image, [B, hidden] or [B, hidden, C].
  mem_k, mem_v = mem_kv[0].astype(jnp.float32), mem_kv[1].astype(jnp.float32)
  k_max = jax.lax.stop_gradient(jnp.maximum(
      jnp.max(chunk_max, axis=1), jnp.max(mem_k, axis=0).reshape(-1)))      # [B, hidden]
  rescale = jnp.exp(jax.lax.stop_gradient(chunk_max) - k_max[:, None])      # [B, S, hidden]
  exp_mem_k = jnp.exp(mem_k - k_max.reshape(b, 1, heads, d))               # [B, M, heads, d]
  normaliser = (jnp.sum(chunk_sum * rescale, axis=1).reshape(b, heads, d)
                + jnp.sum(exp_mem_k, axis=1))
  keys_by_input = jnp.sum(chunk_weighted * rescale[..., None], axis=1)       # [B, hidden, C]
  to_output = context_to_output(keys_by_input, exp_mem_k, normaliser,
                                w_v.astype(jnp.float32), mem_v, w_out.astype(jnp.float32),
                                scale)
  apply_context = functools.partial(_apply_context, dim_head=d, chunk=chunk,
                                    interpret=interpret)
  return _per_batch_shard(apply_context, (True, False, True))(
      y, w_q, to_output.reshape(b, heads * d, f).astype(dtype))
