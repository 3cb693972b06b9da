"""The study's cosine-schedule run (its settings are those of configs/default.py).

Command:
  python -m eo_ddpm_jax.main --config=configs/cosine.py --workdir=runs/cosine

Expected runtime: 11 epochs (62,909 steps of batch 8) projected at 16 minutes on one
H100 in bfloat16 (bench/RESULTS.md; the study took 13-14 hours with the PyTorch library).
Expected result: MSE loss flattening at about 0.01-0.03; terrain with plausible colours
in the epoch-1 grid, sharper by epoch 10 (the study's Figures 5-8).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.schedule = 'cosine'
  return config
