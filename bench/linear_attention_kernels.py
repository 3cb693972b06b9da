"""The fused linear attention's four Triton kernels, timed one Tiling at a time at the
study's layer shapes, and the whole layer (forward and backward) against XLA's version.

For each kernel (`fused_linear_attention.tilings()`) it tries every rows-per-step and warp
count given, and the pipelining stages, with the other kernels at their defaults; the
best per kernel is the one with the least time summed over the layer shapes. Then it
times the layer, forward and backward, with the defaults, with the best tilings and in
XLA (`unet.linear_attention`). `--best_to FILE` writes the best as the value of the
benchmarks' `--linear_attention_tilings` flag, so a later command in the same GPU session
can time the train step with them:

  python -m bench.linear_attention_kernels --best_to /tmp/best.txt
  python -m bench.train_step --precision bfloat16 --batch 256 \\
      --linear_attention_impl triton --linear_attention_tilings "$(cat /tmp/best.txt)"
  python -m bench.linear_attention_kernels --interpret --batch 2 --layers 256x16 \\
      --block_elements 1024 --warps 4 --stages 0 --results ''     # any machine, slow

Needs JAX and Triton on an NVIDIA GPU (or --interpret); synthetic inputs.
"""

# pylint: disable=g-import-not-at-top,g-bad-import-order
from bench import common  # First: sets the environment jax reads at import.

import argparse
import dataclasses
import itertools
import math
import sys
import time

import jax
import jax.numpy as jnp

from eo_ddpm_jax import fused_linear_attention as fused
from eo_ddpm_jax import unet

MEMORY_SLOTS = 4  # The library's num_mem_kv.


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--layers', default='16384x64,4096x128',
                      help='Comma-separated POSITIONSxCHANNELS of the linear-attention '
                           'layers (the study at 128x128: 128x128 px at 64 channels, '
                           '64x64 px at 128).')
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--dim_head', type=int, default=32)
  parser.add_argument('--precision', choices=('bfloat16', 'float32'), default='bfloat16')
  parser.add_argument('--block_elements', default='2048,4096,8192',
                      help='Rows per loop step times the layer width, to try.')
  parser.add_argument('--warps', default='4,8', help='Triton warps per program, to try.')
  parser.add_argument('--stages', default='1,2,4',
                      help='Triton pipelining stages to try at the default tiling (0: '
                           "Triton's default).")
  parser.add_argument('--calls', type=int, default=10, help='Calls per timed block.')
  parser.add_argument('--repeats', type=int, default=3, help='Timed blocks (median).')
  parser.add_argument('--interpret', action='store_true',
                      help="Pallas' interpreter (any backend; for checking this script).")
  parser.add_argument('--best_to', default='',
                      help='Write the best tilings here, as --linear_attention_tilings.')
  common.add_report_flags(parser)
  return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(',') if v.strip()]


def layer_inputs(batch, positions, channels, heads, dim_head, dtype, seed=0):
  """Random inputs of one layer: y [B, N, C] (unit scale, as after its RMSNorm), the
  weights at PyTorch's default init scale, and an output cotangent."""
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  hidden = heads * dim_head
  bound = channels ** -0.5
  normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape)
  return dict(
      y=normal((batch, positions, channels), 1.0).astype(dtype),
      w_q=normal((channels, hidden), bound), w_k=normal((channels, hidden), bound),
      w_v=normal((channels, heads, dim_head), bound),
      w_out=normal((heads, dim_head, channels), hidden ** -0.5),
      mem_kv=normal((2, MEMORY_SLOTS, heads, dim_head), 1.0),
      d_out=normal((batch, positions, channels), 1.0).astype(dtype))


def kernel_calls(inputs, dim_head, interpret):
  """{kernel name: (function, its arguments)}: each Pallas kernel alone, with its
  wrapper's small reductions, on inputs of the layer's shapes."""
  # pylint: disable=protected-access
  y, d_out = inputs['y'], inputs['d_out']
  dtype = y.dtype
  w_q, w_k = inputs['w_q'].astype(dtype), inputs['w_k'].astype(dtype)
  b, n, c = y.shape
  hidden = w_k.shape[1]
  chunk = min(fused.CHUNK, n)
  # The backward's inputs: each chunk's true key maxima (so no exponential overflows)
  # and random cotangents.
  keys = (y @ w_k).astype(jnp.float32).reshape(b, n // chunk, chunk, hidden)
  k_max = jnp.max(keys, axis=2)
  d_sum = jax.random.normal(jax.random.key(2), k_max.shape)
  d_weighted = 0.1 * jax.random.normal(jax.random.key(3), k_max.shape + (c,))
  to_output = (0.1 * jax.random.normal(jax.random.key(1), (b, hidden, c))).astype(dtype)
  return {
      'key_statistics': (
          lambda y, w_k: fused._key_statistics_fwd(y, w_k, None, interpret)[0], (y, w_k)),
      'key_statistics_grad': (
          lambda y, w_k, k_max, d_sum, d_weighted: fused._key_statistics_bwd(
              None, interpret, (y, w_k, k_max), (k_max, d_sum, d_weighted)),
          (y, w_k, k_max, d_sum, d_weighted)),
      'apply_context': (
          lambda y, w_q, t: fused._apply_context_fwd(y, w_q, t, dim_head, None, interpret)[0],
          (y, w_q, to_output)),
      'apply_context_grad': (
          lambda y, w_q, t, d_out: fused._apply_context_bwd(
              dim_head, None, interpret, (y, w_q, t), d_out),
          (y, w_q, to_output, d_out)),
  }


def layer_call(inputs, dim_head, impl):
  """(function, arguments): the layer's output and all its gradients (forward and
  backward), with the fused kernels ('triton'/'interpret') or in XLA ('xla')."""
  heads = inputs['w_v'].shape[1]
  scale = dim_head ** -0.5

  def layer(y, w_q, w_k, w_v, w_out, mem_kv):
    if impl == 'xla':
      dtype = y.dtype
      b, n, _ = y.shape
      q = (y @ w_q.astype(dtype)).reshape(b, n, heads, dim_head)
      k = (y @ w_k.astype(dtype)).reshape(b, n, heads, dim_head)
      return unet.linear_attention(q, k, y, w_v, w_out, mem_kv, scale)
    return fused.fused_linear_attention(y, w_q, w_k, w_v, w_out, mem_kv, scale,
                                        interpret=impl == 'interpret')

  def forward_backward(d_out, *args):
    out, pullback = jax.vjp(layer, *args)
    return pullback(d_out.astype(out.dtype))

  names = ('y', 'w_q', 'w_k', 'w_v', 'w_out', 'mem_kv')
  return forward_backward, (inputs['d_out'],) + tuple(inputs[n] for n in names)


def lower_afresh(fn, args):
  """jax.jit(fn) lowered with the current fused_linear_attention.tilings().

  JAX caches a function's trace by the function, not by module state: without clearing
  its caches, every tiling after the first reuses the first one's kernels (so this
  script's earlier per-kernel rows all timed the default tilings, bench/RESULTS.md).
  """
  jax.clear_caches()
  return jax.jit(fn).lower(*args)


def time_call(fn, args, calls, repeats):
  """(median seconds per call, compile seconds), or (None, reason) when it fails to
  compile or run (e.g. a tiling that asks for more shared memory than the GPU has)."""
  try:
    start = time.perf_counter()
    compiled = lower_afresh(fn, args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
  except Exception as error:  # pylint: disable=broad-except
    return None, f'{type(error).__name__}: {str(error).splitlines()[0][:120]}'

  def block():
    out = None
    for _ in range(calls):
      out = compiled(*args)
    jax.block_until_ready(out)

  return common.time_blocks(block, repeats, calls).median, compile_s


def candidates(args, default: fused.Tiling) -> list[fused.Tiling]:
  """The tilings tried for one kernel: every rows-per-step x warps, then the stages at
  the default tiling (the default first)."""
  tried = [default]
  for elements, warps in itertools.product(_ints(args.block_elements), _ints(args.warps)):
    tried.append(fused.Tiling(elements, warps, default.num_stages))
  for stages in _ints(args.stages):
    tried.append(dataclasses.replace(default, num_stages=stages or None))
  return list(dict.fromkeys(tried))  # Unique, in order.


def describe(tiling: fused.Tiling) -> str:
  return f'{tiling.block_elements}/{tiling.num_warps}/{tiling.num_stages or 0}'


def _ms(seconds) -> str:
  return 'fails' if seconds is None else f'{seconds * 1e3:.3f}'


def main(argv):
  args = parse_args(argv)
  dtype = jnp.dtype(args.precision)
  layers = [tuple(int(v) for v in text.split('x')) for text in args.layers.split(',')]
  inputs = {layer: layer_inputs(args.batch, *layer, args.heads, args.dim_head, dtype)
            for layer in layers}
  calls = {layer: kernel_calls(inputs[layer], args.dim_head, args.interpret)
           for layer in layers}
  current = fused.tilings()  # This GPU's, which the kernels read; restored at the end.
  defaults = dict(current)
  best, kernel_rows, failures = {}, [], []
  for name, default in defaults.items():
    results = []
    for tiling in candidates(args, default):
      current[name] = tiling
      times = []
      for layer in layers:
        seconds, detail = time_call(*calls[layer][name], args.calls, args.repeats)
        times.append(seconds)
        if seconds is None:
          failures.append(f'{name} {describe(tiling)} at {layer[0]}x{layer[1]}: {detail}')
      total = math.inf if None in times else sum(times)
      results.append((total, tiling, times))
      print(f'{name} {describe(tiling)}: {[_ms(t) for t in times]}', flush=True)
    current[name] = default
    best[name] = min(results, key=lambda r: r[0])[1]
    for total, tiling, times in results:
      marks = ' (default)' if tiling == default else ''
      marks += ' **best**' if tiling == best[name] else ''
      kernel_rows.append([name, describe(tiling) + marks] + [_ms(t) for t in times]
                         + [_ms(None if math.isinf(total) else total)])

  # The whole layer, forward and backward: default tilings, best tilings, XLA.
  layer_rows = []
  impl = 'interpret' if args.interpret else 'triton'
  for label, tilings, layer_impl in (('fused, default tilings', defaults, impl),
                                     ('fused, best tilings', best, impl),
                                     ('XLA (unet.linear_attention)', defaults, 'xla')):
    current.update(tilings)
    times = [time_call(*layer_call(inputs[layer], args.dim_head, layer_impl),
                       args.calls, args.repeats)[0] for layer in layers]
    layer_rows.append([label] + [_ms(t) for t in times])
  current.update(defaults)

  best_text = ','.join(f'{name}={describe(tiling)}' for name, tiling in best.items())
  if args.best_to:
    with open(args.best_to, 'w', encoding='utf-8') as f:
      f.write(best_text + '\n')
  shapes = [f'{n} positions x {c} ch' for n, c in layers]
  table = (common.markdown_table(['kernel', 'tiling (elements/warps/stages)']
                                 + [f'{s}, ms' for s in shapes] + ['sum, ms'], kernel_rows)
           + '\n\n' + common.markdown_table(['layer forward + backward']
                                            + [f'{s}, ms' for s in shapes], layer_rows))
  notes = [
      f'Batch {args.batch}, {args.precision}, {args.heads} heads x {args.dim_head}, '
      f'{MEMORY_SLOTS} memory slots; kernels {"interpreted" if args.interpret else "Triton"}.',
      f'Timing: median over {args.repeats} blocks of {args.calls} calls, after one call '
      'past compilation. Each kernel row changes that kernel only; "fails": it did not '
      'compile or run (below).',
      f'Best, as `--linear_attention_tilings`: `{best_text}`.',
      *[f'Failed: {f}' for f in failures[:8]],
      args.note]
  common.report(f'Linear attention kernels, {args.precision}, batch {args.batch}', table,
                notes, args.results)


if __name__ == '__main__':
  main(sys.argv[1:])
