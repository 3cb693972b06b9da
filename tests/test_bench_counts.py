"""Tests for the counts of bench/roofline.py (FLOPs against XLA's cost analysis, layer
kinds from name stacks), bench/gpu_compile.py (bytes of a GPU program's kernels),
bench/kernel_sass.py (a kernel's loop in its SASS) and bench/profile.py (GPU kernels by
the kind of work)."""

import jax
import jax.numpy as jnp
import pytest

from bench import kernel_sass
from bench import profile
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


_HLO = """HloModule jit_step

%fused_computation (p: bf16[4,8]) -> f32[4,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  ROOT %c = f32[4,8]{1,0} convert(%p)
}

ENTRY %main (a: bf16[4,8], k: bf16[3,3,8,2]) -> (f32[4,8], bf16[4,2]) {
  %a = bf16[4,8]{1,0} parameter(0)
  %k = bf16[3,3,8,2]{3,2,1,0} parameter(1)
  %loop_convert_fusion.3 = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/jvp(UNet)/downs_0_attn/convert_element_type"}
  %cc = (bf16[4,2]{1,0}, u8[100]{0}) custom-call(%a, %k), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/jvp(UNet)/mid_block1/block1/proj/conv"}
  %gte = bf16[4,2]{1,0} get-tuple-element(%cc), index=0
  ROOT %t = (f32[4,8]{1,0}, bf16[4,2]{1,0}) tuple(%loop_convert_fusion.3, %gte)
}
"""


def test_gpu_compile_charges_each_kernel_its_operands_and_results():
  from bench import gpu_compile  # pylint: disable=g-import-not-at-top
  found = gpu_compile.kernels(_HLO)
  # The fusion reads bf16[4,8] (64 B) and writes f32[4,8] (128 B); the custom call reads
  # it and the bf16[3,3,8,2] kernel (288 B) and writes bf16[4,2] and its u8[100] scratch.
  assert found == [
      dict(kind='loop_convert_fusion', bytes=64 + 128,
           layer='attention projections and linear attention'),
      dict(kind='__cudnn$convForward', bytes=64 + 288 + 16 + 100,
           layer='ResNet blocks (3x3 convs, 1x1 residual convs)'),
  ]


_SLICING_HLO = """HloModule jit_step

%fused_slice (p0: bf16[4,8], p1: f32[4,8]) -> (f32[1,8], f32[4,8]) {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  %c = f32[4,8]{1,0} convert(%p0)
  %s = f32[1,8]{1,0} slice(%c), slice={[0:1], [0:8]}
  %n = f32[4,8]{1,0} negate(%p1)
  %s1 = f32[1,8]{1,0} slice(%n), slice={[1:2], [0:8]}
  ROOT %t = (f32[1,8]{1,0}, f32[4,8]{1,0}) tuple(%s, %n)
}

ENTRY %main (a: bf16[4,8], b: f32[4,8]) -> (f32[1,8], f32[4,8]) {
  %a = bf16[4,8]{1,0} parameter(0)
  %b = f32[4,8]{1,0} parameter(1)
  ROOT %loop_slice_fusion = (f32[1,8]{1,0}, f32[4,8]{1,0}) fusion(%a, %b), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/jvp(UNet)/mid_block1/block1/norm/slice"}
}
"""


def test_gpu_compile_charges_a_sliced_operand_what_the_slices_keep():
  """A fusion operand that reaches only slices, through elementwise ops, is read only
  where they keep it: p0 -> convert -> one row of 8 bf16 (16 B, not 64). p1 also feeds
  the tuple whole, so it is read in full (128 B); the results are 32 + 128 B."""
  from bench import gpu_compile  # pylint: disable=g-import-not-at-top
  found = gpu_compile.kernels(_SLICING_HLO)
  assert found == [dict(kind='loop_slice_fusion', bytes=(32 + 128) + 16 + 128,
                        layer='ResNet blocks (3x3 convs, 1x1 residual convs)')]


@pytest.mark.parametrize('kernel, kind', [
    # Kernel names from the H200's profile of the batch-256 step (bench/RESULTS.md,
    # session 15), each with what the optimised HLO or the library says it is.
    ('sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x64x32',
     'convolutions (cuDNN)'),
    ('sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc',
     'convolutions (cuDNN)'),
    ('void cask_plugin__5x_cudnn::xmma__5x_cudnn::gemm::kernel', 'convolutions (cuDNN)'),
    ('cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26',
     'full attention (cuDNN)'),
    ('gemm_fusion_dot_170', 'GEMMs'),                       # a 1x1 conv's weight gradient
    ('nvjet_sm90_tst_64x192_64x6_2x1_v_bz_TNN', 'GEMMs'),  # cuBLAS
    ('sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32', 'GEMMs'),
    ('_apply_context_grad_kernel__3', 'Pallas kernels'),
    ('_key_statistics_kernel', 'Pallas kernels'),
    ('input_add_reduce_fusion_13', 'XLA reductions'),      # GroupNorm backward sums
    ('input_convert_reduce_fusion_19', 'XLA reductions'),  # a conv bias gradient
    ('triton_softmax_11', 'XLA reductions'),
    ('loop_multiply_fusion_12', 'XLA elementwise and copies'),  # SiLU
    ('wrapped_concatenate_4', 'XLA elementwise and copies'),    # the skip concatenation
    ('Memset 3', 'XLA elementwise and copies'),
])
def test_profile_sorts_gpu_kernels_by_the_work_they_do(kernel, kind):
  assert profile.work_kind(kernel) == kind


def test_kernel_sass_takes_the_loop_up_to_its_backward_branch():
  """A hand-written listing in cuobjdump's format: the loop is 0x0010-0x0040 (the
  branch back to 0x0010); the forward branch inside it and the trailing self-branch
  after EXIT are not loops."""
  sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                /* 0x00000a0000017a02 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;      /* 0x0000000402047981 */
        /*0020*/               @P1 BRA 0x40 ;                            /* 0x0000000000001947 */
        /*0030*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;  /* 0x000000060408723c */
        /*0040*/               @P0 BRA 0x10 ;                            /* 0xfffffffc00fc0947 */
        /*0050*/                   EXIT ;                                /* 0x000000000000794d */
        /*0060*/                   BRA 0x60;                             /* 0xfffffffc00fc7947 */
"""
  loop = kernel_sass._loop  # pylint: disable=protected-access
  assert loop(sass) == ['LDG.E.128', 'BRA', 'HMMA.16816.F32.BF16', 'BRA']
  assert not loop(sass.replace('BRA 0x10', 'BRA 0x50'))
