"""How close a GPU can get to its peak on the train step: a roofline of its GEMMs and convs.

Counts, from the jaxpr of the project's full train step (abstract shapes: nothing is
compiled or run, so any machine will do), every convolution's and matrix product's FLOPs
and the bytes of its operands and result, grouped by layer kind. On a GPU each of these
is its own kernel that must read its operands from and write its result to memory, and
runs no faster than max(FLOPs / peak, bytes / bandwidth). Summed, that gives an upper
bound on the model-FLOPs utilisation (MFU) that any fusion of the remaining elementwise
ops and reductions (GroupNorm, SiLU, softmax, the optimizer: here counted as free) could
reach, at each card's peak and memory bandwidth:

  python -m bench.roofline                                # study model, bf16, batch 256
  python -m bench.roofline --batch 8 --precision float32

Full attention's logits ([B, heads, N, N + M]) are left out of the bytes: cuDNN's fused
kernel (model.attention_impl=auto on GPUs in bfloat16) keeps them on chip.
"""

# pylint: disable=g-import-not-at-top,g-bad-import-order
from bench import common  # First: sets the environment jax reads at import.

import argparse
import collections
import functools
import math
import re
import sys

import jax
import jax.numpy as jnp

from eo_ddpm_jax import train_step as train_lib

# (dense bf16 peak TFLOP/s, memory TB/s) of each card.
CARDS = {card: (common.PEAK_BF16_TFLOPS[card], tbs)
         for card, tbs in common.HBM_BANDWIDTH_TBS.items()}
# The einsums of full attention's core (unet.attention_in_einsums).
FULL_ATTENTION_CORE = re.compile(r'bhqd,bhkd->bhqk|bhqk,bhkd->bhqd')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_flags(parser)
  parser.add_argument('--batch', type=int, default=256)
  parser.set_defaults(precision='bfloat16')
  return parser.parse_args(argv)


def abstract_step(args, attention_impl: str = 'einsum', linear_attention_impl: str = 'xla'):
  """(step, state, batch): the train step at the benchmark's config and args.batch, with
  these attention kernels (einsum and xla trace into plain ops, which this module
  counts; einsum's logits are dropped below), and its arguments as abstract shapes."""
  config = common.study_config(args, args.batch)
  config.model.attention_impl = attention_impl
  config.model.linear_attention_impl = linear_attention_impl
  model = train_lib.create_model(config.model)
  learning_rate_fn = train_lib.create_learning_rate_fn(config.optim, 1000)
  tx = train_lib.create_optimizer(config.optim, learning_rate_fn)
  step = train_lib.make_train_step(config, model, tx,
                                   train_lib.create_schedule(config.diffusion),
                                   learning_rate_fn)
  image_shape = (args.image_size, args.image_size, args.channels)
  init = functools.partial(train_lib.create_train_state, config, model, tx,
                           image_shape=image_shape)
  state = jax.eval_shape(init, jax.random.PRNGKey(0))
  batch = {'image': jax.ShapeDtypeStruct((args.batch, *image_shape), jnp.float32)}
  return step, state, batch


def equations(jaxpr, outer_names: str = ''):
  """(equation, its full name stack) of a jaxpr and of the jaxprs inside it (jit,
  custom_vjp, ...), whose equations' name stacks are relative to the one calling them."""
  for eqn in jaxpr.eqns:
    names = '/'.join(n for n in (outer_names, str(eqn.source_info.name_stack)) if n)
    yield eqn, names
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from equations(sub.jaxpr, names)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from equations(sub, names)


def flops(eqn) -> int:
  """2 x multiply-adds of a dot_general or conv_general_dilated."""
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  if eqn.primitive.name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    return 2 * out.size * math.prod(lhs.shape[i] for i in lhs_contract)
  # rhs_spec: (out features, in features per group, spatial...).
  spec = eqn.params['dimension_numbers'].rhs_spec
  window = math.prod(rhs.shape[i] for i in spec[2:])
  # An input-dilated (transposed) conv's window meets real pixels at one tap in
  # prod(lhs_dilation); cuDNN computes only those.
  window //= math.prod(eqn.params['lhs_dilation'] or (1,))
  return 2 * out.size * rhs.shape[spec[1]] * window


def layer_kind(name_stack: str) -> str:
  """The U-Net layer kind an op belongs to, from its name stack."""
  if FULL_ATTENTION_CORE.search(name_stack):
    return 'full attention core (q k^T, p v)'
  layer = re.search(r'UNet\)+/([^/]+)', name_stack)  # e.g. 'downs_0_attn', 'mid_block1'
  name = layer.group(1) if layer else ''
  if 'attn' in name:
    return 'attention projections and linear attention'
  if 'sample' in name:
    return 'down- and upsampling convs'
  if 'block' in name:
    return 'ResNet blocks (3x3 convs, 1x1 residual convs)'
  return 'other (stem, final conv, time MLP)'


def tally(jaxpr, dim_head: int) -> dict[str, list]:
  """{layer kind: [FLOPs, bytes, per-op roofline seconds at each card]} over all GEMMs."""
  rows = collections.defaultdict(lambda: [0, 0] + [0.0] * len(CARDS))
  for eqn, names in equations(jaxpr):
    if eqn.primitive.name not in ('dot_general', 'conv_general_dilated'):
      continue
    kind = layer_kind(names)
    arrays = [v.aval for v in (*eqn.invars, *eqn.outvars)]
    if kind.startswith('full attention'):
      # Keep q, k, v, the output and their gradients ([..., dim_head]); drop the logits.
      arrays = [a for a in arrays if a.shape[-1] == dim_head]
    op_flops, op_bytes = flops(eqn), sum(a.size * a.dtype.itemsize for a in arrays)
    row = rows[kind]
    row[0] += op_flops
    row[1] += op_bytes
    for i, (peak, bandwidth) in enumerate(CARDS.values()):
      row[2 + i] += max(op_flops / (peak * 1e12), op_bytes / (bandwidth * 1e12))
  return rows


def model_flops(args) -> int:
  """The convs' and GEMMs' FLOPs of the step in float32, whose layers take the library's
  forms: MFU's numerator, as bench/train_step.py counts it (16-bit compute's upsampling,
  unet.TransposedUpsampleConv, computes fewer)."""
  step, state, batch = abstract_step(argparse.Namespace(**{**vars(args),
                                                           'precision': 'float32'}))
  return sum(flops(eqn) for eqn, _ in equations(jax.make_jaxpr(step)(state, batch).jaxpr)
             if eqn.primitive.name in ('dot_general', 'conv_general_dilated'))


def main(argv):
  args = parse_args(argv)
  step, state, batch = abstract_step(args)
  rows = tally(jax.make_jaxpr(step)(state, batch).jaxpr, args.attn_dim_head)
  total = [sum(r[i] for r in rows.values()) for i in range(2 + len(CARDS))]
  library_flops = total[0] if args.precision == 'float32' else model_flops(args)
  # A check on the count: XLA's analysis of the whole step (elementwise ops included).
  xla_flops = common.cpu_model_flops(step, state, batch)
  ms = lambda s: f'{s * 1e3:.1f} ms'
  headers = ['layers', 'GFLOP', 'GB moved', 'FLOP/byte'] + [
      f'{card} roofline' for card in CARDS]
  table_rows = [[kind, f'{r[0] / 1e9:,.0f}', f'{r[1] / 1e9:,.1f}',
                 f'{r[0] / max(r[1], 1):,.0f}', *[ms(t) for t in r[2:]]]
                for kind, r in sorted(rows.items(), key=lambda kv: -kv[1][2])]
  table_rows.append(['**all convs and GEMMs**', f'{total[0] / 1e9:,.0f}',
                     f'{total[1] / 1e9:,.1f}', f'{total[0] / total[1]:,.0f}',
                     *[ms(t) for t in total[2:]]])
  ceilings = []
  for i, (card, (peak, bandwidth)) in enumerate(CARDS.items()):
    at_peak = total[0] / (peak * 1e12)
    model_at_peak = library_flops / (peak * 1e12)
    ceilings.append(
        f'{card} ({peak:.0f} TFLOP/s, {bandwidth} TB/s): the FLOPs alone take {ms(at_peak)}, '
        f'the bytes alone {ms(total[1] / (bandwidth * 1e12))}; one kernel per op at its '
        f'roofline {ms(total[2 + i])}: **MFU at most {model_at_peak / total[2 + i]:.0%}**; '
        f'35% MFU needs a step of {ms(model_at_peak / 0.35)}')
  common.report(
      f'Roofline of the train step, {args.precision}, batch {args.batch}',
      common.markdown_table(headers, table_rows),
      [f'{common.describe_unet(args)}, {args.image_size}x{args.image_size}x{args.channels}.',
       'Counted from the jaxpr of the full train step (no device runs it): each conv and '
       'GEMM, forward and backward, reads its operands and writes its result once; '
       'everything else (normalisation, activations, softmax, optimizer) is counted as '
       'free, so these are upper bounds on MFU. Full attention\'s logits are left out '
       '(cuDNN\'s fused kernel keeps them on chip). Per-op roofline: max(FLOPs / peak, '
       'bytes / bandwidth).',
       f'XLA\'s cost analysis of the whole step (CPU lowering): '
       f'{common.format_flops(xla_flops)}; the convs and GEMMs here are '
       f'{total[0] / xla_flops:.1%} of it (XLA leaves out the 3x3 taps that fall on the '
       f'zero padding; the kernels compute them).' if xla_flops else '',
       f'MFU counts the model\'s FLOPs in its float32 (library) forms, '
       f'{library_flops / 1e9:,.0f} GFLOP of convs and GEMMs, as bench/train_step.py does; '
       f'the kernels above compute {total[0] / library_flops:.1%} of them.',
       *ceilings, args.note],
      args.results)


if __name__ == '__main__':
  main(sys.argv[1:])
