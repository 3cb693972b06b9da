"""Sampling speed: the project's jitted samplers beside denoising-diffusion-pytorch.

Times `eo_ddpm_jax.diffusion.ddpm_sample` (ancestral, all T steps, one fori_loop),
`ddim_sample` (50 steps, one scan) and `dpm_solver.dpm_solver_2m_sample` (DPM-Solver++(2M),
25 steps, one scan) for a batch of 25 images (the study's 5x5 grid), each compiled once
and sharded over the devices as `main --mode=sample` runs it (on a CPU, one device per
core, the batch padded to a multiple of their count);
with --compare-torch, the library's `GaussianDiffusion.sample` on the same device
(`p_sample_loop`, and `ddim_sample` via `sampling_timesteps`; the library has no
DPM-Solver). Reports seconds per
25 images and per step (median over repeats, with the spread), the U-Net forward's FLOPs
per step (XLA cost analysis) and the MFU they imply, peak memory, and the JAX / torch
ratio; appends the table to bench/RESULTS.md.

A step costs the same whatever T is, so slow machines can time fewer steps and
extrapolate: --ddpm_num_steps=20 runs the same loop over a 20-step schedule,
--ddim_num_steps=10 a 10-step DDIM, --dpm_num_steps=5 a 5-step DPM-Solver; the table says
when it extrapolates.

  python -m bench.sample --dim 32 --image_size 64 --ddpm_num_steps 20 --compare-torch
"""

# pylint: disable=g-import-not-at-top,g-bad-import-order
from bench import common  # First: sets the environment jax reads at import.

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eo_ddpm_jax import sampling
from eo_ddpm_jax import train_step as train_lib

SAMPLERS = ('ddpm', 'ddim', 'dpm_solver')
# Samplers the library 1.10.12 has (GaussianDiffusion.sample).
TORCH_SAMPLERS = ('ddpm', 'ddim')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_flags(parser)
  parser.add_argument('--num_images', type=int, default=25, help='Images per sample run.')
  parser.add_argument('--cpu_devices', type=int, default=0,
                      help='JAX CPU devices the images are sharded over, as train.cpu_devices '
                           '(0: one per core that divides the study\'s training batch, as '
                           'main.py chooses; 1: one device).')
  parser.add_argument('--samplers', default='ddpm,ddim,dpm_solver', help='Comma-separated subset of '
                      + ', '.join(SAMPLERS) + '.')
  parser.add_argument('--ddim_steps', type=int, default=50, help='DDIM steps of a real run.')
  parser.add_argument('--dpm_steps', type=int, default=25,
                      help='DPM-Solver++(2M) steps of a real run.')
  parser.add_argument('--dpm_num_steps', type=int, default=0,
                      help='DPM-Solver steps to time (0: --dpm_steps); fewer are extrapolated.')
  parser.add_argument('--ddpm_num_steps', type=int, default=0,
                      help='DDPM steps to time (0: all T); fewer are extrapolated to T.')
  parser.add_argument('--torch_ddpm_num_steps', type=int, default=0,
                      help='DDPM steps to time for torch (0: as JAX); eager torch is slow.')
  parser.add_argument('--ddim_num_steps', type=int, default=0,
                      help='DDIM steps to time (0: --ddim_steps); fewer are extrapolated.')
  parser.add_argument('--warmup_runs', type=int, default=1,
                      help='Untimed JAX sample runs after compilation.')
  parser.add_argument('--repeats', type=int, default=3, help='Timed sample runs.')
  parser.add_argument('--torch_repeats', type=int, default=None,
                      help='Timed torch sample runs (default: --repeats).')
  parser.add_argument('--torch_warmup_forwards', type=int, default=2,
                      help='Untimed U-Net forwards before timing torch (cuDNN set-up).')
  return parser.parse_args(argv)


def plan(args, sampler: str, framework: str = 'jax') -> tuple[int, int]:
  """(steps timed, steps of the real run) for a sampler."""
  if sampler == 'ddpm':
    if framework == 'torch' and args.torch_ddpm_num_steps:
      return args.torch_ddpm_num_steps, args.timesteps
    return args.ddpm_num_steps or args.timesteps, args.timesteps
  if sampler == 'dpm_solver':
    return args.dpm_num_steps or args.dpm_steps, args.dpm_steps
  return args.ddim_num_steps or args.ddim_steps, args.ddim_steps


def jax_forward_flops(model, params, shape) -> float | None:
  """FLOPs of one U-Net forward on a [B, H, W, C] batch: the cost of a step.

  Cost analysis of the whole loop would count its body once, not once per iteration.
  Counted on the CPU with einsum attention (see `common.cpu_model_flops`), in float32,
  whose layers take the library's forms (16-bit compute's upsampling runs fewer FLOPs).
  """
  model = model.clone(attention_impl='einsum', linear_attention_impl='xla',
                      dtype=jnp.float32)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct((shape[0],), jnp.int32)
  return common.cpu_model_flops(lambda p, x, t: model.apply({'params': p}, x, t),
                                params, x, t)


def run_jax(args, config, sampler: str, model, params, mesh) -> dict:
  """Compiles and times one sampler over `plan(...)[0]` steps (`main`'s sampling code)."""
  steps, _ = plan(args, sampler)
  # A T'-step DDPM schedule gives the same loop body; only the trip count changes.
  schedule = common.make_schedule(config.diffusion,
                                  timesteps=steps if sampler == 'ddpm' else None)
  batch_size = sampling.sharded_batch_size(args.num_images, mesh.size)
  sample_fn = sampling.make_sample_fn(
      config, model, schedule, sampler=sampler, batch_size=batch_size, num_steps=steps,
      eta=config.sample.ddim_eta, clip_denoised=True, mesh=mesh)
  keys = sampling.image_keys(jax.random.PRNGKey(args.seed), 0, batch_size)
  start = time.perf_counter()
  compiled = sample_fn.lower(params, keys).compile()
  compile_s = time.perf_counter() - start

  last = {}

  def run():
    last['images'] = compiled(params, keys)
    last['images'].block_until_ready()

  for _ in range(args.warmup_runs):
    run()
  timing = common.time_blocks(run, args.repeats, steps)
  images = np.asarray(last['images'])
  if not np.all(np.isfinite(images)):
    raise FloatingPointError(f'JAX {sampler} sampling produced non-finite values')
  memory, memory_kind = common.jax_peak_memory()
  return dict(timing=timing, compile_s=compile_s, memory=memory, memory_kind=memory_kind,
              steps=steps)


def run_torch(args, sampler: str, torch_env) -> dict:
  """Times the library's GaussianDiffusion.sample for one sampler."""
  torch, device, library = torch_env
  steps, _ = plan(args, sampler, 'torch')
  torch.manual_seed(args.seed)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  if sampler == 'ddpm':
    model = common.build_torch_diffusion(library, args, device, timesteps=steps)
  else:
    if steps >= args.timesteps:
      raise ValueError(f'the library runs DDIM only for fewer steps than T={args.timesteps}')
    model = common.build_torch_diffusion(library, args, device, sampling_timesteps=steps)
  model.eval()
  autocast = functools.partial(common.torch_autocast, torch, device, args.precision)

  with torch.inference_mode(), autocast():
    x = torch.randn(args.num_images, args.channels, args.image_size, args.image_size,
                    device=device)
    t = torch.zeros(args.num_images, dtype=torch.long, device=device)
    for _ in range(args.torch_warmup_forwards):
      model.model(x, t)
  common.torch_sync(torch, device)

  last = {}

  def run():
    with autocast():
      last['images'] = model.sample(batch_size=args.num_images)
    common.torch_sync(torch, device)

  timing = common.time_blocks(run, args.torch_repeats or args.repeats, steps)
  if not bool(torch.isfinite(last['images']).all()):
    raise FloatingPointError(f'torch {sampler} sampling produced non-finite values')
  memory, memory_kind = common.torch_peak_memory(torch, device)
  return dict(timing=timing, compile_s=None, memory=memory, memory_kind=memory_kind,
              steps=steps)


def row(name, sampler, args, result, flops_per_step, peak_tflops):
  timing = result['timing']
  steps, full_steps = result['steps'], plan(args, sampler)[1]
  per_run = timing.median * full_steps
  per_run_text = f'{per_run:.2f} s' + (f' (extrapolated from {steps})'
                                       if steps != full_steps else '')
  achieved = flops_per_step / timing.median / 1e12 if flops_per_step else None
  mfu = f'{achieved / peak_tflops:.1%}' if achieved and peak_tflops else 'n/a'
  label = {'dpm_solver': 'DPM-Solver++(2M)'}.get(sampler, sampler.upper())
  return [name, f'{label} {full_steps}', args.precision,
          f'{result["compile_s"]:.1f} s' if result['compile_s'] is not None else '-',
          per_run_text, f'{timing.median * 1e3:.2f} ms', timing.spread,
          f'{achieved:.2f}' if achieved else 'n/a', mfu, common.format_bytes(result['memory'])]


HEADERS = ['framework', 'sampler', 'precision', 'compile', 's per run', 'per step (median)',
           'spread (min–max)', 'TFLOP/s', 'MFU', 'peak memory']


def main(argv):
  args = parse_args(argv)
  samplers = [s.strip() for s in args.samplers.split(',') if s.strip()]
  unknown = set(samplers) - set(SAMPLERS)
  if unknown:
    raise SystemExit(f'--samplers: unknown {sorted(unknown)}; valid: {", ".join(SAMPLERS)}')
  config = common.study_config(args, common.STUDY_BATCH)
  common.start_jax_devices(args, config)  # Before anything starts JAX's backend.
  facts = common.jax_device_facts()
  peak = args.peak_tflops or common.default_peak_tflops(facts['kind'], facts['platform'])

  model = train_lib.create_model(config.model)
  image_shape = (args.image_size, args.image_size, args.channels)
  params = jax.jit(model.init)(jax.random.PRNGKey(args.seed),
                               jnp.zeros((1, *image_shape)), jnp.zeros((1,), jnp.int32))
  params = params['params']
  flops = jax_forward_flops(model, params, (args.num_images, *image_shape))
  mesh = train_lib.make_mesh(jax.devices())
  params = jax.device_put(params, train_lib.replicated_sharding(mesh, params))

  torch_env = None
  notes = [
      f'{common.describe_unet(args)}, {args.num_images} images of '
      f'{args.image_size}x{args.image_size}x{args.channels}, T={args.timesteps} '
      f'{args.schedule}, {args.objective}; random (untrained) weights; JAX sharded over '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s), '
      f'{sampling.sharded_batch_size(args.num_images, jax.device_count())} images a run '
      '(the padding is discarded, as in main --mode=sample).',
      f'Timing: JAX compiled once, {args.warmup_runs} warm-up run(s), then {args.repeats} '
      'timed runs; per step = run time / steps run. s per run = per step x the real '
      'run\'s steps.',
      'TFLOP/s and MFU from XLA\'s FLOPs of one U-Net forward on the batch '
      f'({common.format_flops(flops)}) per step; peak '
      + (f'{peak:g} TFLOP/s.' if peak else 'none (CPU).'),
  ]
  if args.compare_torch:
    try:
      torch, device, threads = common.torch_setup(args)
      library, _ = common.load_torch_library()
      torch_env = (torch, device, library)
      notes.append(f'torch: eager on {device}, {threads}, GaussianDiffusion.sample under '
                   'inference_mode' + (' and torch.autocast(bfloat16)'
                                       if args.precision == 'bfloat16' else '') + '.')
    except Exception as error:  # pylint: disable=broad-except
      notes.append(f'torch comparison failed: {type(error).__name__}: {error}')
      print(f'torch comparison failed: {error!r}', file=sys.stderr)

  rows = []
  for sampler in samplers:
    jax_result = run_jax(args, config, sampler, model, params, mesh)
    rows.append(row('JAX (eo_ddpm_jax)', sampler, args, jax_result, flops, peak))
    print(common.markdown_table(HEADERS, rows[-1:]), flush=True)
    if torch_env is None or sampler not in TORCH_SAMPLERS:
      continue
    try:
      torch_result = run_torch(args, sampler, torch_env)
    except Exception as error:  # pylint: disable=broad-except
      notes.append(f'torch {sampler} failed: {type(error).__name__}: {error}')
      print(f'torch {sampler} failed: {error!r}', file=sys.stderr)
      continue
    rows.append(row('denoising-diffusion-pytorch 1.10.12', sampler, args, torch_result,
                    flops, peak))
    print(common.markdown_table(HEADERS, rows[-1:]), flush=True)
    ratio = torch_result['timing'].median / jax_result['timing'].median
    notes.append(f'**{sampler.upper()} speed ratio JAX / torch (per step): {ratio:.2f}x**')
  notes.append(f'Peak memory: JAX {jax_result["memory_kind"]}'
               + (f'; torch {common.torch_peak_memory(*torch_env[:2])[1]}'
                  if torch_env else '') + '.')
  if args.note:
    notes.append(args.note)
  table = common.markdown_table(HEADERS, rows)
  common.report(f'Sampling {args.num_images} images, {args.precision}, {facts["kind"]}',
                table, notes, args.results)


if __name__ == '__main__':
  main(sys.argv[1:])
