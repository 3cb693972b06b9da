"""Demo: a small U-Net on synthetic SEN12MS at 64x64, on a laptop CPU in about 5 minutes.

Command (after `./run.sh demo` made the data, or by hand):
  python -m tfds_sen12ms.synthetic --out_dir=data/demo/raw --num_scenes=12 --patches_per_scene=40
  python -m tfds_sen12ms.build --manual_dir=data/demo/raw --data_dir=data/demo/tfds --config=summer_rgb
  python -m eo_ddpm_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m eo_ddpm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=sample

Keeps the study's schedule family (sigmoid), T, objective and optimizer shape, but
shrinks the U-Net (dim=32, (1, 2, 4)), the images (32x32: 64x64 measured 2.8 s per
step on 2 CPU cores even with dim=16, too slow to learn in minutes), computes in float32
(bfloat16 is slow on CPUs) and raises the learning rate to learn in a few hundred steps.
Sample grids use DDIM (25 steps) to keep per-epoch sampling short on a CPU.

Expected runtime: RUNTIME on 2 CPU cores. Expected result: RESULT.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.data_dir = 'data/demo/tfds'
  config.data.image_size = 32
  config.model.dim = 32
  config.model.dim_mults = (1, 2, 4)
  config.model.dtype = 'float32'
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 20
  # Same ema-pytorch schedule, but updated every step: with the study's every-10-steps
  # updates the EMA of a 240-step run still averages over nearly all of it (measured:
  # grids of epochs 2-4 alike and noisy).
  config.optim.ema_update_every = 1
  config.optim.ema_update_after_step = 20
  config.train.batch_size = 8
  config.train.num_epochs = 4  # 480 patches -> 60 steps per epoch, 240 in all.
  config.train.checkpoint_every_steps = 100
  config.train.grid_sampler = 'ddim'
  config.train.grid_ddim_steps = 25
  config.sample.sampler = 'ddim'
  config.sample.batch_size = 25
  return config
