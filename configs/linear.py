"""The study's linear-schedule run: SEN12MS summer RGB, 128x128, T = 500, 11 epochs.

Command:
  python -m eo_ddpm_jax.main --config=configs/linear.py --workdir=runs/linear

Settings (the study's): U-Net dim=64, dim_mults=(1, 2, 4) (9,908,483 params);
batch 8; AdamW lr 2e-5 with linear warm-up then cosine decay to 0; gradient
clipping at norm 1; EMA 0.995 (ema-pytorch schedule); bfloat16 compute with float32
params and loss; objective pred_noise; a checkpoint and a 5x5 EMA sample grid after
every epoch. 45,753 patches -> 5,719 steps per epoch, 62,909 steps in all.

Expected runtime: the study took 13-14 hours on one GPU (PyTorch, AMP); see
bench/RESULTS.md for this implementation's measured step rate.
Expected result: the loss falls to about 0.01-0.03 (MSE); terrain structure with
plausible colours in the grids after one epoch, sharper by epoch 10.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.schedule = 'linear'
  return config
