"""Tests for the counts of bench/roofline.py (FLOPs against XLA's cost analysis, layer
kinds from name stacks), bench/hlo_traffic.py (bytes of a compiled program's kernels),
bench/kernel_sass.py (a kernel's loop in its SASS) and bench/profile.py (GPU kernels by
the kind of work, profiled kernels against their bytes)."""

import collections

import jax
import jax.numpy as jnp
import pytest

from bench import common
from bench import hlo_traffic
from bench import kernel_sass
from bench import profile
from bench import roofline


def _conv(stride, groups):
  def conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), 'VALID', feature_group_count=groups,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return conv


def _input_dilated_conv(x, kernel):
  # A stride-2 transposed conv as XLA sees it: the input dilated 2x with zeros.
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((0, 0), (0, 0)), lhs_dilation=(2, 2),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('fn, shapes', [
    (lambda a, b: jnp.einsum('bnk,bkf->bnf', a, b), [(2, 5, 3), (2, 3, 4)]),
    (lambda a, b: jnp.einsum('nc,nf->cf', a, b), [(7, 3), (7, 6)]),
    (_conv(1, 1), [(2, 6, 5, 4), (3, 3, 4, 8)]),    # a 3x3 conv (no padding: see below)
    (_conv(2, 1), [(2, 8, 8, 4), (2, 2, 4, 6)]),    # a 2x2 stride-2 downsampling conv
    (_conv(1, 2), [(1, 5, 5, 4), (3, 3, 2, 6)]),    # grouped
    # Each 4x4 window over the dilated input meets 2x2 real pixels: 4 of 16 taps.
    (_input_dilated_conv, [(2, 4, 5, 3), (4, 4, 3, 5)]),
])
def test_flops_equal_xla_cost_analysis(fn, shapes):
  """Without padding, XLA's count of a dot or conv is 2 x multiply-adds, as ours; both
  leave out the taps that fall on an input dilation's zeros, which cuDNN's transposed
  conv skips. (With zero padding XLA leaves out the taps that fall on it; the kernels
  compute them.)"""
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
    ('transpose(jvp(UNet))/mid_attn/bhqd,bhkd->bhqk', 'full attention core (q k^T, p v)'),
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


def test_hlo_traffic_charges_each_kernel_its_operands_and_results():
  found = hlo_traffic.kernels(_HLO)
  # The fusion reads bf16[4,8] (64 B) and writes f32[4,8] (128 B); the custom call reads
  # it and the bf16[3,3,8,2] kernel (288 B) and writes bf16[4,2] and its u8[100] scratch.
  assert found == [
      dict(name='loop_convert_fusion.3', kind='loop_convert_fusion', bytes=64 + 128,
           op_name='jit(step)/jvp(UNet)/downs_0_attn/convert_element_type',
           layer='attention projections and linear attention'),
      dict(name='cc', kind='__cudnn$convForward', bytes=64 + 288 + 16 + 100,
           op_name='jit(step)/jvp(UNet)/mid_block1/block1/proj/conv',
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


def test_hlo_traffic_charges_a_sliced_operand_what_the_slices_keep():
  """A fusion operand that reaches only slices, through elementwise ops, is read only
  where they keep it: p0 -> convert -> one row of 8 bf16 (16 B, not 64). p1 also feeds
  the tuple whole, so it is read in full (128 B); the results are 32 + 128 B."""
  found = hlo_traffic.kernels(_SLICING_HLO)
  assert [(k['kind'], k['bytes'], k['layer']) for k in found] == [
      ('loop_slice_fusion', (32 + 128) + 16 + 128,
       'ResNet blocks (3x3 convs, 1x1 residual convs)')]


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


def test_profile_reads_the_traffic_of_the_profiled_module(tmp_path):
  """An XLA dump holds set-up programs beside the profiled one; the kernels' bytes come
  from the module whose kernels took the most of the profiled time, keyed as a GPU names
  its kernels ('.' -> '_')."""
  (tmp_path / 'module_0010.jit_step.sm_9.0_gpu_after_optimizations.txt').write_text(_HLO)
  (tmp_path / 'module_0002.jit_init.sm_9.0_gpu_after_optimizations.txt').write_text(
      _SLICING_HLO)
  (tmp_path / 'module_0010.jit_step.sm_9.0_gpu_after_optimizations-memory-usage-report.txt'
   ).write_text(_SLICING_HLO.replace('loop_slice_fusion', 'loop_convert_fusion.3'))
  step_ms = collections.Counter({'loop_convert_fusion_3': 1.0, 'loop_slice_fusion': 0.5})
  traffic = profile.kernel_traffic(str(tmp_path), step_ms)
  assert sorted(traffic) == ['cc', 'loop_convert_fusion_3']
  assert traffic['loop_convert_fusion_3']['bytes'] == 64 + 128
  init_ms = collections.Counter({'loop_convert_fusion_3': 1.0, 'loop_slice_fusion': 1.5})
  assert sorted(profile.kernel_traffic(str(tmp_path), init_ms)) == ['loop_slice_fusion']
  assert profile.kernel_traffic(str(tmp_path / 'missing'), step_ms) == {}


def test_profile_puts_kernels_against_their_floor_at_the_bandwidth():
  """A kernel moving 4 GB in 2 ms runs at 2 TB/s; at 4 TB/s its floor is 1 ms, so it
  spends 1 ms over it. Library kernels (no HLO name) and kernels that never ran drop out."""
  traffic = {'input_reduce_fusion_3': dict(bytes=4e9, op_name='jit(step)/jvp(UNet)/a/reduce'),
             'loop_add_fusion_1': dict(bytes=1e9, op_name='jit(step)/jvp(UNet)/b/add'),
             'loop_copy_fusion': dict(bytes=1e9, op_name='')}
  events = collections.Counter({'input_reduce_fusion_3': 2.0, 'loop_add_fusion.1': 1.5,
                                'sm90_xmma_fprop_implicit_gemm': 9.0})
  rows = profile.traffic_rows(events, traffic, 4.0)
  assert [(r['name'], r['gb'], r['tbs'], r['floor_ms'], r['over_ms'], r['op'])
          for r in rows] == [
      ('loop_add_fusion.1', 1.0, 1.0 / 1.5, 0.25, 1.25, 'jvp(UNet)/b/add'),
      ('input_reduce_fusion_3', 4.0, 2.0, 1.0, 1.0, 'jvp(UNet)/a/reduce'),
  ]
  # Without a card's bandwidth (a CPU): no floor, the slowest first.
  rows = profile.traffic_rows(events, traffic, None)
  assert [(r['name'], r['floor_ms'], r['over_ms']) for r in rows] == [
      ('input_reduce_fusion_3', None, None), ('loop_add_fusion.1', None, None)]
  table, summary = profile.traffic_table(rows, None, top=1)
  assert table.count('fusion') == 1 and 'took 3.5 ms per call moving 5.0 GB: 1.43 TB/s' in summary


@pytest.mark.parametrize('device_kind, platform, tbs', [
    ('NVIDIA H200', 'gpu', 4.8),                 # H200 datasheet: 4.8 TB/s.
    ('NVIDIA H100 80GB HBM3', 'gpu', 3.35),      # H100 SXM5 datasheet: 3.35 TB/s.
    ('NVIDIA L4', 'gpu', None),                  # Not listed: no floor, no guess.
    ('cpu', 'cpu', None),
])
def test_card_figure_takes_the_bandwidth_of_the_named_card(device_kind, platform, tbs):
  assert common.card_figure(common.HBM_BANDWIDTH_TBS, device_kind, platform) == tbs


def test_profile_shortens_kernel_names_keeping_both_ends():
  """Two cuDNN kernels that differ only after their first 90 characters stay apart."""
  head = 'sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize' + 'x' * 40
  first, second = head + '_warpgroupsize1x1x1_execute_segment_k_off', head + '_alignc8_kernel'
  assert profile.shortened('short_name', 90) == 'short_name'
  shown = profile.shortened(first, 90), profile.shortened(second, 90)
  assert [len(s) for s in shown] == [90, 90] and shown[0] != shown[1]
  assert shown[0] == first[:57] + '...' + first[-30:]
