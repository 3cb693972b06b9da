"""Loads denoising-diffusion-pytorch 1.10.12, the reference the tests compare against.

The library imports torchvision (and pytorch-fid, which subclasses torchvision's
Inception blocks) at import time, but PyPI's torchvision does not load beside the CPU
build of torch. The Unet, GaussianDiffusion and Trainer.save/load never call
torchvision, so a stand-in module with just the names used at import is enough.
"""

import importlib
import sys
import types

import pytest


def _install_torchvision_stand_in() -> None:
  """Registers a minimal `torchvision` so the library's imports succeed."""
  if 'torchvision' in sys.modules:
    return
  torch_nn = importlib.import_module('torch.nn')
  tv = types.ModuleType('torchvision')
  tv.__version__ = '0.0.0+stand_in'
  tv.transforms = types.ModuleType('torchvision.transforms')
  tv.utils = types.ModuleType('torchvision.utils')
  tv.models = types.ModuleType('torchvision.models')
  inception = types.ModuleType('torchvision.models.inception')
  # pytorch-fid subclasses these at import time; plain Modules suffice for that.
  for name in ('InceptionA', 'InceptionC', 'InceptionE', 'Inception3'):
    setattr(inception, name, type(name, (torch_nn.Module,), {}))
  tv.models.inception = inception
  tv.models.utils = types.ModuleType('torchvision.models.utils')
  tv.models.utils.load_state_dict_from_url = None
  for module in (tv, tv.transforms, tv.utils, tv.models, inception, tv.models.utils):
    sys.modules[module.__name__] = module


def load_ddpm_library():
  """Returns the `denoising_diffusion_pytorch.denoising_diffusion_pytorch` module.

  Skips the calling test (with the reason) when the `torch` extra is not installed.
  """
  pytest.importorskip('torch', reason='needs the [torch] extra: pip install -e .[torch]')
  _install_torchvision_stand_in()
  library = pytest.importorskip(
      'denoising_diffusion_pytorch.denoising_diffusion_pytorch',
      reason='needs denoising-diffusion-pytorch==1.10.12 (the [torch] extra)')
  version = importlib.import_module('denoising_diffusion_pytorch.version').__version__
  assert version == '1.10.12', f'tests pin denoising-diffusion-pytorch 1.10.12, found {version}'
  return library
