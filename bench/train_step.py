"""Training-step throughput: the project's jitted step beside denoising-diffusion-pytorch.

Times the full step of `eo_ddpm_jax.train_step` (loss, gradients, clipping, AdamW, EMA),
compiled with `compile_train_step` exactly as training compiles it, on a synthetic batch
held on the device. With --compare-torch it times, on the same device, the step the
library's `Trainer` runs: `GaussianDiffusion(Unet(...))` forward under autocast, backward,
`clip_grad_norm_`, `Adam.step`, `zero_grad` and `ema_pytorch.EMA.update()` (eager PyTorch,
as the study ran it). It reports images/s (median over repeated blocks of steps, with the
spread), the step's model FLOPs (XLA cost analysis, see `common.cpu_model_flops`) and the
MFU they imply, the peak memory,
the time the study's 11 epochs would take at this rate, and appends the table to
bench/RESULTS.md.

  python -m bench.train_step --dim 32 --dim_mults 1,2,4 --image_size 64 --batch 8 \
      --compare-torch --interleave

--interleave alternates JAX and torch blocks: on a shared VM whose speed drifts over
minutes, timing one framework after the other gave ratios from 0.88x to 0.93x on one day.
"""

# pylint: disable=g-import-not-at-top,g-bad-import-order
from bench import common  # First: sets the environment jax reads at import.

import argparse
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eo_ddpm_jax import train_step as train_lib


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_flags(parser)
  parser.add_argument('--batch', type=int, default=8, help='Global batch size.')
  parser.add_argument('--cpu_devices', type=int, default=0,
                      help='JAX CPU devices the batch is sharded over, as train.cpu_devices '
                           '(0: one per core that divides the batch; 1: one device).')
  parser.add_argument('--warmup_steps', type=int, default=3,
                      help='Untimed steps after compilation (JAX) / before timing (torch).')
  # One EMA update happens every 10 steps in both frameworks: blocks of 10 steps
  # each contain exactly one, so blocks are comparable.
  parser.add_argument('--steps_per_repeat', type=int, default=10,
                      help='Steps per timed block (synchronised at the block end).')
  parser.add_argument('--repeats', type=int, default=5, help='Timed blocks per framework.')
  parser.add_argument('--torch_repeats', type=int, default=None,
                      help='Timed blocks for torch (default: --repeats).')
  parser.add_argument('--interleave', action='store_true',
                      help='With --compare-torch: alternate JAX and torch blocks (--repeats '
                           'pairs) instead of timing one framework after the other, so a '
                           'machine whose speed drifts between minutes slows both alike; '
                           'also reports the median of the per-pair ratios.')
  parser.add_argument('--check_attention', action='store_true',
                      help='Also report how far the U-Net output with the chosen attention '
                           'kernels is from the einsum and XLA reference on one batch.')
  parser.add_argument('--no_torch_flops', dest='torch_flops', action='store_false',
                      help='Skip counting torch FLOPs (one extra eager step under '
                           'torch.utils.flop_counter).')
  args = parser.parse_args(argv)
  if args.interleave and args.torch_repeats is not None:
    parser.error('--torch_repeats does not apply with --interleave: JAX and torch blocks '
                 'come in pairs, --repeats of them.')
  return args


def study_steps() -> int:
  """Optimizer steps of the study's run: 11 epochs of floor(45,753 / 8) batches."""
  return common.STUDY_EPOCHS * (common.STUDY_DATASET_SIZE // common.STUDY_BATCH)


def projected_hours(images_per_s: float) -> float:
  """Hours for the study's 11 epochs at batch 8, at the measured images/s."""
  return study_steps() * common.STUDY_BATCH / images_per_s / 3600


def prepare_jax(args, config) -> dict:
  """Builds, compiles and warms up the project's train step.

  Returns its facts (compile time, FLOPs, params) with `run_block(steps)` (runs and
  synchronises `steps` steps) and `finish()` (checks the loss, adds peak memory).
  """
  model = train_lib.create_model(config.model)
  learning_rate_fn = train_lib.create_learning_rate_fn(config.optim, study_steps())
  tx = train_lib.create_optimizer(config.optim, learning_rate_fn)
  schedule = common.make_schedule(config.diffusion)
  step_fn = train_lib.make_train_step(config, model, tx, schedule, learning_rate_fn)

  mesh = train_lib.make_mesh(jax.devices())  # The batch is split over them, as in training.
  image_shape = (args.image_size, args.image_size, args.channels)
  init = functools.partial(train_lib.create_train_state, config, model, tx,
                           image_shape=image_shape)
  rng = jax.random.PRNGKey(args.seed)
  state_sharding = train_lib.replicated_sharding(mesh, jax.eval_shape(init, rng))
  state = jax.jit(init, out_shardings=state_sharding)(rng)
  batch_sharding = train_lib.batch_sharding(mesh)
  images = np.random.default_rng(args.seed).uniform(
      -1, 1, (args.batch, *image_shape)).astype(np.float32)
  batch = {'image': jax.device_put(images, batch_sharding['image'])}
  num_params = sum(x.size for x in jax.tree.leaves(state.params))

  jitted = train_lib.compile_train_step(step_fn, mesh, state_sharding, batch_sharding)
  start = time.perf_counter()
  compiled = jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  # The model's FLOPs: the same step with einsum and XLA linear attention (the GPU
  # kernels do not lower for the CPU), analysed on the CPU, in float32, whose layers
  # take the library's forms. MFU counts the model's FLOPs as the library (and torch's
  # counter) does, not the fewer that 16-bit compute's upsampling runs
  # (unet.TransposedUpsampleConv: 16 of the 36 multiply-adds per input pixel).
  flops_config = config.copy_and_resolve_references()
  flops_config.model.attention_impl = 'einsum'
  flops_config.model.linear_attention_impl = 'xla'
  flops_config.model.dtype = 'float32'
  flops = common.cpu_model_flops(
      train_lib.make_train_step(flops_config, train_lib.create_model(flops_config.model),
                                tx, schedule, learning_rate_fn), state, batch)

  attention_gap = None
  if args.check_attention:
    attention_gap = attention_difference(config, state.params, images)
  holder = {'state': state}

  def run_block(steps):
    state, metrics = holder['state'], None
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    holder['state'] = state
    return metrics

  def finish() -> dict:
    loss = float(run_block(1)['loss'])
    if not math.isfinite(loss):
      raise FloatingPointError(f'JAX train step produced a non-finite loss {loss}')
    memory, memory_kind = common.jax_peak_memory()
    return dict(memory=memory, memory_kind=memory_kind, loss=loss)

  run_block(args.warmup_steps)
  return dict(run_block=run_block, finish=finish, compile_s=compile_s, flops=flops,
              params=num_params, attention_gap=attention_gap)


def attention_difference(config, params, images: np.ndarray) -> dict[str, float]:
  """How far the U-Net output (t = T/2) with the configured attention kernels and with
  einsum and XLA linear attention, both in the compute dtype, are from a float32
  einsum and XLA reference: max |out - ref| / max |ref| for each pair of kernel names
  ('full attention + linear attention')."""
  t = jnp.full((images.shape[0],), config.diffusion.timesteps // 2, jnp.int32)

  def output(impls, dtype):
    model_config = config.model.copy_and_resolve_references()
    model_config.attention_impl, model_config.linear_attention_impl = impls
    model_config.dtype = dtype
    model = train_lib.create_model(model_config)
    return np.asarray(jax.jit(model.apply)({'params': params}, images, t), np.float64)

  reference = output(('einsum', 'xla'), 'float32')
  chosen = (train_lib.attention_impl(config.model.attention_impl, config.model.dtype),
            train_lib.linear_attention_impl(config.model.linear_attention_impl,
                                            config.model.dtype))
  return {' + '.join(impls): float(np.abs(output(impls, config.model.dtype) - reference).max()
                                   / np.abs(reference).max())
          for impls in dict.fromkeys((chosen, ('einsum', 'xla')))}


def prepare_torch(args, config) -> dict:
  """Builds and warms up the library's Trainer step (eager) on the same device; returns
  the same keys as `prepare_jax`."""
  torch, device, threads = common.torch_setup(args)
  library, ema_class = common.load_torch_library()
  torch.manual_seed(args.seed)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  diffusion = common.build_torch_diffusion(library, args, device)
  optim = config.optim
  # The Trainer's optimizer: Adam(lr, betas=adam_betas); AdamW with weight decay 0 in
  # JAX is the same update. Its learning-rate schedule does not change the cost.
  opt = torch.optim.Adam(diffusion.parameters(), lr=optim.learning_rate,
                         betas=(optim.b1, optim.b2), eps=optim.eps)
  ema = ema_class(diffusion, beta=optim.ema_decay, update_every=optim.ema_update_every,
                  update_after_step=optim.ema_update_after_step).to(device)
  # Start past the copy-only warm-up so the timed steps see the steady-state lerp
  # every update_every steps, as the JAX step does from its step 110 on.
  ema.step.fill_(optim.ema_update_after_step + 1)
  images = torch.rand(args.batch, args.channels, args.image_size, args.image_size,
                      device=device)  # [0, 1]: the library normalises to [-1, 1] itself.
  num_params = sum(p.numel() for p in diffusion.model.parameters())

  def step():
    with common.torch_autocast(torch, device, args.precision):
      loss = diffusion(images)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(diffusion.parameters(), optim.grad_clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update()
    return loss

  def run_block(steps):
    loss = None
    for _ in range(steps):
      loss = step()
    common.torch_sync(torch, device)
    return loss

  run_block(args.warmup_steps)
  flops = None
  if args.torch_flops:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
      run_block(1)
    flops = float(counter.get_total_flops())
  def finish() -> dict:
    loss = float(run_block(1).detach())
    if not math.isfinite(loss):
      raise FloatingPointError(f'torch train step produced a non-finite loss {loss}')
    memory, memory_kind = common.torch_peak_memory(torch, device)
    return dict(memory=memory, memory_kind=memory_kind, loss=loss)

  return dict(run_block=run_block, finish=finish, compile_s=None, flops=flops,
              params=num_params, threads=threads, device=str(device))


def time_and_finish(result: dict, args, repeats: int) -> None:
  """Times `repeats` blocks of one framework, then adds its loss and peak memory."""
  result['timing'] = common.time_blocks(
      lambda: result['run_block'](args.steps_per_repeat), repeats, args.steps_per_repeat)
  result.update(result['finish']())


def time_interleaved(jax_run, torch_run, args) -> tuple[common.Timing, common.Timing]:
  """Alternates one JAX and one torch block, `args.repeats` times."""
  def block(run):
    # A pause first: torch's OpenMP workers spin for a while after a parallel region
    # and, on a CPU, would slow the start of the other framework's block (measured on
    # 2-step blocks of a tiny U-Net: JAX 43-187 ms per step interleaved, 37 ms alone).
    time.sleep(1.0)
    return common.time_blocks(lambda: run['run_block'](args.steps_per_repeat), 1,
                              args.steps_per_repeat).seconds

  jax_seconds, torch_seconds = [], []
  for _ in range(args.repeats):
    jax_seconds += block(jax_run)
    torch_seconds += block(torch_run)
  return common.Timing(jax_seconds), common.Timing(torch_seconds)


def row(name, precision, args, result, peak_tflops):
  timing = result['timing']
  images_per_s = args.batch / timing.median
  flops = result['flops']
  achieved = flops / timing.median / 1e12 if flops else None
  mfu = f'{achieved / peak_tflops:.1%}' if achieved and peak_tflops else 'n/a'
  return [name, precision, args.batch, f'{result["params"]:,}',
          f'{result["compile_s"]:.1f} s' if result['compile_s'] is not None else '-',
          f'{timing.median * 1e3:.1f} ms', timing.spread, f'{images_per_s:.1f}',
          common.format_flops(flops), f'{achieved:.2f}' if achieved else 'n/a', mfu,
          common.format_bytes(result['memory']), f'{projected_hours(images_per_s):.2f} h']


HEADERS = ['framework', 'precision', 'batch', 'params', 'compile', 'step (median)',
           'spread (min–max)', 'images/s', 'FLOP/step', 'TFLOP/s', 'MFU', 'peak memory',
           'study 11 epochs']


def main(argv):
  args = parse_args(argv)
  config = common.study_config(args, args.batch)
  common.start_jax_devices(args, config)  # Before anything starts JAX's backend.
  facts = common.jax_device_facts()
  peak = args.peak_tflops or common.default_peak_tflops(facts['kind'], facts['platform'])

  # JAX is timed and its peak memory read before torch loads, unless the two alternate
  # (on a CPU the peak is the process's, which then includes torch).
  interleave = args.compare_torch and args.interleave
  jax_result = prepare_jax(args, config)
  if not interleave:
    time_and_finish(jax_result, args, args.repeats)
  torch_result = torch_error = None
  if args.compare_torch:
    try:
      torch_result = prepare_torch(args, config)
    except Exception as error:  # pylint: disable=broad-except
      # The JAX figures stay worth recording when the library cannot run here.
      torch_error = error
      print(f'torch comparison failed: {error!r}', file=sys.stderr)
  if interleave and torch_result is not None:
    jax_result['timing'], torch_result['timing'] = time_interleaved(
        jax_result, torch_result, args)
    jax_result.update(jax_result['finish']())
    torch_result.update(torch_result['finish']())
  elif interleave:
    time_and_finish(jax_result, args, args.repeats)
  elif torch_result is not None:
    time_and_finish(torch_result, args, args.torch_repeats or args.repeats)
  rows = [row('JAX (eo_ddpm_jax)', args.precision, args, jax_result, peak)]
  notes = [
      f'{common.describe_unet(args)}, {args.image_size}x'
      f'{args.image_size}x{args.channels}, T={args.timesteps} {args.schedule}, '
      f'{args.objective}; synthetic batch sharded over {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s).',
      f'Timing: {args.warmup_steps} warm-up steps after compilation, then {args.repeats} '
      f'blocks of {args.steps_per_repeat} steps, each synchronised at its end; '
      'step = block time / steps'
      + ('; JAX and torch blocks alternate.' if torch_result and interleave else '.'),
      f'JAX full attention: {train_lib.attention_impl(args.attention_impl, args.precision)}'
      f'; linear attention: '
      f'{train_lib.linear_attention_impl(args.linear_attention_impl, args.precision)}'
      + (f' (tilings {args.linear_attention_tilings})'
         if args.linear_attention_tilings else '') + '.',
      'FLOP/step: XLA cost analysis of the un-optimised step lowered for the CPU (JAX; '
      'counts the convolutions the GPU program hides in cuDNN calls), in float32, whose '
      'layers take the library\'s forms (bfloat16\'s upsampling computes fewer); '
      'torch.utils.flop_counter over one step (torch). MFU: against '
      + (f'{peak:g} TFLOP/s' if peak else 'no peak (CPU)') + '.',
      f'Peak memory: JAX {jax_result["memory_kind"]}'
      + (' (torch loaded too: --interleave).' if torch_result and interleave else '.'),
  ]
  if jax_result['attention_gap'] is not None:
    gaps = ', '.join(f'{impl} {gap:.2e}' for impl, gap in jax_result['attention_gap'].items())
    notes.append(f'U-Net output in {args.precision} vs a float32 einsum-attention reference '
                 f'and XLA linear-attention reference (same params, one batch, max abs '
                 f'difference / max abs): {gaps}.')
  notes += [
      f'study 11 epochs: {study_steps():,} steps x {common.STUDY_BATCH} images '
      '(11 x floor(45,753 / 8)) at the measured images/s of this batch size.',
  ]
  if torch_error is not None:
    notes.append(f'torch comparison failed: {type(torch_error).__name__}: {torch_error}')
  if torch_result is not None:
    rows.append(row('denoising-diffusion-pytorch 1.10.12', args.precision, args,
                    torch_result, peak))
    ratio = torch_result['timing'].median / jax_result['timing'].median
    notes += [
        f'torch: eager on {torch_result["device"]}, {torch_result["threads"]}; '
        + ('forward under torch.autocast(bfloat16), no GradScaler (the Trainer\'s amp '
           'uses fp16 autocast + GradScaler); ' if args.precision == 'bfloat16' else
           'float32; ')
        + 'Adam(lr, betas=(0.9, 0.99)) + clip_grad_norm_(1.0) + '
        'EMA(beta=0.995, update_every=10).update() (past its copy-only warm-up). '
        f'Peak memory: {torch_result["memory_kind"]}.',
        f'**Speed ratio JAX / torch (images/s): {ratio:.2f}x**',
    ]
    if interleave:
      pair_ratios = (np.asarray(torch_result['timing'].seconds)
                     / np.asarray(jax_result['timing'].seconds))
      notes.append(f'Per-pair ratios (torch block / the JAX block before it): median '
                   f'{np.median(pair_ratios):.2f}x, range {pair_ratios.min():.2f}-'
                   f'{pair_ratios.max():.2f}x.')
  projections = [f'{name} {projected_hours(args.batch / r["timing"].median):.2f} h'
                 for name, r in (('JAX', jax_result), ('torch', torch_result))
                 if r is not None]
  notes.append(f'**Projected study training (11 epochs x 45,753 patches at batch '
               f'{common.STUDY_BATCH}, at this run\'s images/s of batch {args.batch}): '
               + '; '.join(projections) + '**')
  if args.note:
    notes.append(args.note)
  table = common.markdown_table(HEADERS, rows)
  common.report(f'Train step, {args.precision}, batch {args.batch}, {facts["kind"]}',
                table, notes, args.results)


if __name__ == '__main__':
  main(sys.argv[1:])
