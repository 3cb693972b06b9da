"""The study's recipe at the demo's size, run by denoising-diffusion-pytorch itself.

Trains the library's `GaussianDiffusion(Unet(...))` with the model, schedule, objective,
batch, learning rate, EMA and step count of `configs/demo_study.py` on the demo's real
patches (built by `./run.sh demo`), in the loop the library's `Trainer` runs (random
flip, Adam with betas (0.9, 0.99) at a constant learning rate, gradient norm clipped at
1.0, `ema_pytorch.EMA`), and saves a 5x5 grid of EMA samples (DDIM, the config's grid
steps) every `--grid_every` steps. It answers whether the blobs that recipe gives in 720
steps come from this project or from the training budget: README, "What the demo shows".
(`configs/demo.py` adds input scaling, which the library does not have.)

  python -m bench.library_demo --out_dir=runs/library_demo
"""

# pylint: disable=g-import-not-at-top,g-bad-import-order
from bench import common  # First: sets the environment jax reads at import.

import argparse
import os
import sys
import time

import numpy as np
from PIL import Image

from configs import demo_study
from eo_ddpm_jax import evaluate


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out_dir', default='runs/library_demo', help='Where grids go.')
  parser.add_argument('--data_dir', default=None,
                      help='The built demo dataset (default: configs/demo_study.py data.data_dir).')
  parser.add_argument('--steps', type=int, default=None,
                      help='Training steps (default: the config\'s 720).')
  parser.add_argument('--grid_every', type=int, default=240, help='Steps between grids.')
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args(argv)


def save_grid(images, path: str) -> None:
  """images: torch [25, 3, S, S] in [0, 1] -> a 5x5 PNG grid."""
  _, channels, size, _ = images.shape
  grid = images.reshape(5, 5, channels, size, size).permute(0, 3, 1, 4, 2)
  grid = grid.reshape(5 * size, 5 * size, channels).numpy()
  Image.fromarray(np.round(grid * 255).clip(0, 255).astype(np.uint8)).save(path)


def main(argv):
  args = parse_args(argv)
  config = demo_study.get_config()
  if args.data_dir:
    config.data.data_dir = args.data_dir
  steps = args.steps or config.train.num_epochs * 60  # 480 patches, batch 8.
  real = evaluate.load_real_patches(config, config.eval.num_real)  # [N, S, S, 3], [-1, 1]
  library, ema_class = common.load_torch_library()
  import torch
  torch.manual_seed(args.seed)
  data = torch.from_numpy((real + 1) / 2).permute(0, 3, 1, 2).contiguous()  # [0, 1]
  model = library.Unet(dim=config.model.dim, dim_mults=tuple(config.model.dim_mults),
                       attn_heads=config.model.attn_heads,
                       attn_dim_head=config.model.attn_dim_head, flash_attn=False)
  diffusion = library.GaussianDiffusion(
      model, image_size=config.data.image_size, timesteps=config.diffusion.timesteps,
      sampling_timesteps=config.train.grid_ddim_steps,
      beta_schedule=config.diffusion.schedule, objective=config.diffusion.objective)
  ema = ema_class(diffusion, beta=config.optim.ema_decay,
                  update_every=config.optim.ema_update_every)
  optimizer = torch.optim.Adam(diffusion.parameters(), lr=config.optim.learning_rate,
                               betas=(0.9, 0.99))
  generator = torch.Generator().manual_seed(args.seed)
  batch = config.train.batch_size
  os.makedirs(args.out_dir, exist_ok=True)
  start = time.time()
  for step in range(1, steps + 1):
    x = data[torch.randint(0, len(data), (batch,), generator=generator)]
    flip = torch.rand(batch, generator=generator) < 0.5
    x[flip] = x[flip].flip(-1)
    loss = diffusion(x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(diffusion.parameters(), config.optim.grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad()
    ema.update()
    if step % args.grid_every == 0 or step == steps:
      with torch.no_grad():
        samples = ema.ema_model.sample(batch_size=25)
      path = os.path.join(args.out_dir, f'step_{step:05d}.png')
      save_grid(samples, path)
      print(f'step {step}: loss {loss.item():.4f}, {time.time() - start:.0f} s, {path}')


if __name__ == '__main__':
  main(sys.argv[1:])
