"""Tests for bench/roofline.py: its FLOP counts against XLA's cost analysis, and the
layer kinds it reads from name stacks."""

import jax
import jax.numpy as jnp
import pytest

from bench import roofline


def _conv(stride, groups):
  def conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), 'VALID', feature_group_count=groups,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return conv


@pytest.mark.parametrize('fn, shapes', [
    (lambda a, b: jnp.einsum('bnk,bkf->bnf', a, b), [(2, 5, 3), (2, 3, 4)]),
    (lambda a, b: jnp.einsum('nc,nf->cf', a, b), [(7, 3), (7, 6)]),
    (_conv(1, 1), [(2, 6, 5, 4), (3, 3, 4, 8)]),    # a 3x3 conv (no padding: see below)
    (_conv(2, 1), [(2, 8, 8, 4), (2, 2, 4, 6)]),    # a 2x2 stride-2 downsampling conv
    (_conv(1, 2), [(1, 5, 5, 4), (3, 3, 2, 6)]),    # grouped
])
def test_flops_equal_xla_cost_analysis(fn, shapes):
  """Without padding, XLA's count of a dot or conv is 2 x multiply-adds, as ours.
  (With zero padding XLA leaves out the taps that fall on it; the kernels compute them.)"""
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  ops = [eqn for eqn, _ in roofline.equations(jax.make_jaxpr(fn)(*args).jaxpr)
         if eqn.primitive.name in ('dot_general', 'conv_general_dilated')]
  assert len(ops) == 1
  assert roofline.flops(ops[0]) == jax.jit(fn).lower(*args).cost_analysis()['flops']


def test_equations_give_full_name_stacks_inside_nested_jaxprs():
  @jax.named_scope('outer')
  def fn(x):
    return jax.jit(lambda y: jnp.dot(y, y))(x)

  names = [names for eqn, names in roofline.equations(
      jax.make_jaxpr(fn)(jnp.ones((3, 3))).jaxpr) if eqn.primitive.name == 'dot_general']
  assert len(names) == 1 and names[0].startswith('outer')


@pytest.mark.parametrize('name_stack, kind', [
    ('jvp(UNet)/downs_0_attn/bnk,bnc->bkc', 'attention projections and linear attention'),
    ('transpose(jvp(UNet))/mid_attn/bqhd,bkhd->bhqk', 'full attention core (q k^T, p v)'),
    ('transpose(jvp(UNet))/ups_1_upsample', 'down- and upsampling convs'),
    ('jvp(UNet)/downs_1_downsample/...c,cf->...f', 'down- and upsampling convs'),
    ('transpose(jvp(UNet))/final_res_block/block1/proj',
     'ResNet blocks (3x3 convs, 1x1 residual convs)'),
    ('jvp(UNet)/mid_block2/res_conv', 'ResNet blocks (3x3 convs, 1x1 residual convs)'),
    ('jvp(UNet)/init_conv', 'other (stem, final conv, time MLP)'),
    ('transpose(jvp(UNet))/final_conv/nc,nf->cf', 'other (stem, final conv, time MLP)'),
])
def test_layer_kind(name_stack, kind):
  assert roofline.layer_kind(name_stack) == kind
