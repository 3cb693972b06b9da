"""The study's recipe in miniature: a small U-Net on synthetic SEN12MS at 32x32, 720 steps.

What `./run.sh compare` trains once per schedule (README, "Evaluating runs and
comparing schedules", and docs/demo_report/) and what `python -m bench.library_demo`
gives the PyTorch library. `configs/demo.py`, the README's demo, starts from it.

  python -m eo_ddpm_jax.main --config=configs/demo_study.py --workdir=runs/demo_study \
    --config.data.data_dir=data/demo/tfds   # after ./run.sh demo made the data

Keeps the study's schedule family (sigmoid), T=500, objective (pred_noise) and optimizer
shape, but shrinks the U-Net (dim=16, (1, 2, 4)), the images (32x32: 64x64 measured 2.8 s
per step on 2 CPU cores even with dim=16, too slow to learn in minutes; at 16x16 the fields
of the real patches are no longer recognisable), computes in float32 (bfloat16 is slow on
CPUs) and raises the learning rate to 2e-3 (stable with the clip at 1.0; at 5e-4-1e-3 the
grids kept 1-2 px of coloured noise along the tile borders for 500+ steps). dim=16 instead
of 32 fits 3x the steps (0.37 s per step on one CPU device, 0.27 s sharded over 2; the
old dim=32 demo ran 240 steps in ~4.5 min).
Sample grids use DDIM (25 steps; the final --mode=sample grid 50) to keep sampling short.

Measured (2 CPU cores, otherwise idle, one JAX CPU device per core): data 38 s + training
320 s (720 steps at ~0.27 s/step; compile, 12 checkpoints and 12 grids included) +
sampling 28 s = 6 min 25 s. The loss falls from ~1 to ~0.02 by step 600; the grids show
smooth blobs in the right land/water colours (pinkish-tan fields, dark blue-green forest
and water patches) but no sharp field edges, rivers or towns. The library itself, trained
with these settings on the same patches (`python -m bench.library_demo`), gives the same
blobs at 720 steps. Nearly 3x the steps is not enough either: 2,040 steps (34 epochs,
~14 min on one core, grids included) give forest, field and urban regions in the right
colours with sharper borders, but still no field parcels or rivers. Why, and what
`configs/demo.py` changes: its docstring.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.data_dir = 'data/demo/tfds'
  config.data.image_size = 32
  config.model.dim = 16
  config.model.dim_mults = (1, 2, 4)
  config.model.dtype = 'float32'
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 50
  # Same ema-pytorch schedule, but updated every step: with the study's every-10-steps
  # updates the EMA of a 240-step run still averages over nearly all of it (measured:
  # grids of epochs 2-4 alike and noisy).
  config.optim.ema_update_every = 1
  config.optim.ema_update_after_step = 20
  config.train.batch_size = 8
  config.train.num_epochs = 12  # 480 patches -> 60 steps per epoch, 720 in all.
  config.train.checkpoint_every_steps = 100_000  # Only the per-epoch checkpoints.
  config.train.grid_sampler = 'ddim'
  config.train.grid_ddim_steps = 25
  config.sample.sampler = 'ddim'
  config.sample.batch_size = 25
  # Evaluation sized for the CPU: epochs 1, 6 and 12 (60 steps an epoch), 128 samples in
  # 20 DPM-Solver steps against all 480 patches; measured 40 s a checkpoint on 2 busy cores.
  config.eval.checkpoint_steps = (60, 360, 720)
  config.eval.num_samples = 128
  config.eval.batch_size = 64
  config.eval.steps = 20
  config.eval.num_real = 480
  return config
