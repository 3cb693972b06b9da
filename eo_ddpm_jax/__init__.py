"""eo_ddpm_jax: DDPMs for Sentinel-2 images in JAX/Flax, equal to denoising-diffusion-pytorch.

The library surface: noise schedules, the diffusion math and samplers (pure functions
over a `Schedule` and a denoiser `fn(x_t, t)`), the U-Net, and the PyTorch weight
converter. Training, data and I/O live in their own modules (`train`, `input_pipeline`)
and are not imported here, so this import needs only JAX, Flax and NumPy.
"""

from eo_ddpm_jax.diffusion import ddim_sample
from eo_ddpm_jax.diffusion import ddpm_sample
from eo_ddpm_jax.diffusion import p_mean_variance
from eo_ddpm_jax.diffusion import predict_noise_from_start
from eo_ddpm_jax.diffusion import predict_start_from_noise
from eo_ddpm_jax.diffusion import predict_start_from_v
from eo_ddpm_jax.diffusion import predict_v
from eo_ddpm_jax.diffusion import q_posterior
from eo_ddpm_jax.diffusion import q_sample
from eo_ddpm_jax.diffusion import training_loss
from eo_ddpm_jax.schedules import OBJECTIVES
from eo_ddpm_jax.schedules import SCHEDULES
from eo_ddpm_jax.schedules import Schedule
from eo_ddpm_jax.schedules import cosine_beta_schedule
from eo_ddpm_jax.schedules import linear_beta_schedule
from eo_ddpm_jax.schedules import loss_weight
from eo_ddpm_jax.schedules import make_schedule
from eo_ddpm_jax.schedules import schedule_as
from eo_ddpm_jax.schedules import schedule_from_betas
from eo_ddpm_jax.schedules import sigmoid_beta_schedule
from eo_ddpm_jax.torch_convert import unet_params_from_torch
from eo_ddpm_jax.torch_convert import unet_params_to_torch
from eo_ddpm_jax.unet import UNet
from eo_ddpm_jax.unet import UNetStudy

__version__ = '0.1.0'
