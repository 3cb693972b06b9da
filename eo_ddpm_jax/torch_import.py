"""Import of denoising-diffusion-pytorch 1.x checkpoints into a run directory.

Owns `--mode=import_torch`: it reads a checkpoint of the library's `Trainer`
(`model-N.pt`: a dict of step, model, opt, ema, scaler and version), or a bare
`GaussianDiffusion` or `Unet` state_dict, with `torch.load(weights_only=True)` (tensors
and plain containers only; it never unpickles code). From tensor shapes and stored
buffers it infers the U-Net, the schedule and the objective; it then writes, in the
workdir:

- `config.py`: a self-contained config file for `--config` of later runs;
- `betas.npy`: only when the betas match no named schedule (`diffusion.schedule='custom'`);
- `checkpoints/<step>`: an Orbax checkpoint as training writes it (step, params, EMA
  params, AdamW state with the Adam moments), without a data iterator position.

A checkpoint does not hold everything; these come from the base config
(configs/default.py unless one is given): the image size (`data.image_size`, 128 by
default; the weights fit any size divisible by the U-Net's downsampling), the GroupNorm
groups (`model.resnet_block_groups`, 8 as in the library: groups leave no trace in the
shapes), the EMA settings (the defaults equal the Trainer's: 0.995, every 10 steps),
gradient clipping, offset noise, input scale and the data, train and sample groups.
Only torch is needed, not the library.
"""

import dataclasses
import functools
import os
import pickle
import pprint
import re
from collections.abc import Mapping
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from eo_ddpm_jax import checkpoints
from eo_ddpm_jax import config_check
from eo_ddpm_jax import run_config
from eo_ddpm_jax import schedules
from eo_ddpm_jax import torch_convert
from eo_ddpm_jax import train_step as train_step_lib
from eo_ddpm_jax import unet

SUPPORTED_VERSIONS = '1.x (tested with 1.10.12)'
_TESTED_VERSION = '1.10.12'
CONFIG_FILE = 'config.py'
BETAS_FILE = 'betas.npy'

# Keys of the dict `Trainer.save` writes; a checkpoint needs the first two.
_TRAINER_REQUIRED = ('step', 'model')
_TRAINER_OPTIONAL = ('opt', 'ema', 'scaler', 'version')
_TRAINER_KEYS = _TRAINER_REQUIRED + _TRAINER_OPTIONAL
_UNET_STEM = 'init_conv.weight'  # The first key of every Unet state_dict.
_DIFFUSION_UNET_PREFIX = 'model.'  # GaussianDiffusion.model
# ema_pytorch.EMA wraps the whole GaussianDiffusion: its copy is `ema_model`, the
# online model is saved again as `online_model` (include_online_model=True).
_EMA_UNET_PREFIX = 'ema_model.' + _DIFFUSION_UNET_PREFIX
_EMA_MODEL_PREFIXES = ('ema_model.', 'online_model.')
_EMA_BUFFERS = ('initted', 'step')
# GaussianDiffusion's buffers: every Schedule table but snr, and the loss weight.
_DIFFUSION_BUFFERS = tuple(f for f in schedules.Schedule._fields if f != 'snr') + (
    'loss_weight',)
# A 2.x ResNet block normalises with RMSNorm (a gain `g`), 1.x with GroupNorm
# (`weight`, `bias`).
_V2_BLOCK_NORM = re.compile(r'(^|\.)block[12]\.norm\.(?!weight$|bias$)[^.]+$')
# Tolerances. The library rounds its float64 tables to float32 (relative error
# < 6e-8); the named schedules differ from each other by far more than 1e-6.
_BETAS_RTOL = 1e-6
# The objectives' loss weights differ by orders of magnitude; float32 storage, and for
# a custom schedule its float32-rounded betas, move them by less than 1e-4.
_LOSS_WEIGHT_RTOL = 1e-3
_MAX_DETAIL_CHARS = 200  # Of a torch error quoted in ours.


class TorchImportError(ValueError):
  """A checkpoint that cannot be imported; the message names the file, key and fix."""


@dataclasses.dataclass(frozen=True)
class ImportResult:
  """What `import_trainer_checkpoint` wrote.

  Attributes:
    config: the run's config (also written as `config_path`).
    config_path: `<workdir>/config.py`.
    checkpoint_path: the Orbax step folder.
    step: the imported optimizer step (the checkpoint's step number).
    source: 'trainer', 'diffusion' (a GaussianDiffusion state_dict) or 'unet'.
    notes: what was assumed, dropped or approximated, in words (also logged).
  """
  config: ml_collections.ConfigDict
  config_path: str
  checkpoint_path: str
  step: int
  source: str
  notes: tuple[str, ...]


# ---------------------------------------------------------------------------------------
# Reading the file.

def _torch_detail(error: BaseException) -> str:
  text = str(error)
  operand = re.search(r'Unsupported operand \S+', text)
  detail = operand.group(0) if operand else text.strip().split('\n')[0]
  return f'{type(error).__name__}: {detail[:_MAX_DETAIL_CHARS]}'


def load_checkpoint(path: str) -> Any:
  """`torch.load(path, map_location='cpu', weights_only=True)` with plain errors.

  Raises:
    FileNotFoundError: no such file.
    TorchImportError: not a torch.save file, or one that needs code to unpickle.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Importing PyTorch checkpoints needs torch: pip install -e .[torch] '
                      '(see README).') from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No checkpoint file {path!r}; pass the model-N.pt that the '
                            'library\'s Trainer wrote, e.g. '
                            '--torch_checkpoint=results/model-10.pt.')
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    code = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
    if code:
      raise TorchImportError(
          f'{path} stores a pickled Python object ({code.group(1)}), which needs code '
          'to load; this importer reads tensors only (torch.load weights_only=True) and '
          'never runs code from a file. If you trust the file, re-save its weights in a '
          'trusted environment, e.g. torch.save(model.state_dict(), "unet.pt") for a '
          'whole module saved with torch.save(model), and import that.') from e
    raise TorchImportError(
        f'{path} is not a checkpoint written by torch.save ({_torch_detail(e)}). Pass the '
        'model-N.pt that the library\'s Trainer wrote, or a state_dict saved with '
        'torch.save.') from e
  except Exception as e:  # pylint: disable=broad-except
    # Truncated zip archives, legacy files cut short, ...: torch raises many kinds.
    raise TorchImportError(
        f'{path} is not a readable torch.save file ({_torch_detail(e)}). Is it complete? '
        'Pass the model-N.pt that the library\'s Trainer wrote.') from e


@dataclasses.dataclass
class _Parts:
  """The pieces of a loaded checkpoint, whatever its kind."""
  source: str
  model: Mapping[str, Any]  # GaussianDiffusion or Unet state_dict.
  unet_prefix: str  # 'model.' or ''.
  step: int = 0
  opt: Mapping[str, Any] | None = None
  ema: Mapping[str, Any] | None = None
  scaler: Any = None
  version: str | None = None


def _is_state_dict(obj: Mapping) -> bool:
  return bool(obj) and all(hasattr(v, 'shape') for v in obj.values())


def _parts(data: Any, path: str) -> _Parts:
  """Tells a Trainer checkpoint from a GaussianDiffusion or Unet state_dict."""
  expected = (f'a Trainer checkpoint (a dict of {", ".join(_TRAINER_KEYS)}), a '
              'GaussianDiffusion state_dict or a Unet state_dict')
  if not isinstance(data, Mapping):
    raise TorchImportError(f'{path} holds a {type(data).__name__}, not a dict; expected '
                           f'{expected}.')
  if _is_state_dict(data):
    if _UNET_STEM in data:
      return _Parts('unet', data, '')
    if _DIFFUSION_UNET_PREFIX + _UNET_STEM in data:
      return _Parts('diffusion', data, _DIFFUSION_UNET_PREFIX)
    stems = sorted(k[:-len(_UNET_STEM)] for k in data if k.endswith(_UNET_STEM))
    found = (f'its Unet keys start with {stems[0]!r}' if stems
             else f'no key {_UNET_STEM!r} or {_DIFFUSION_UNET_PREFIX + _UNET_STEM!r}')
    raise TorchImportError(f'{path} is a state_dict of neither a Unet nor a '
                           f'GaussianDiffusion ({found}); expected {expected}.')
  if 'model' not in data:
    raise TorchImportError(f'{path}: a dict without the key \'model\' (keys: '
                           f'{", ".join(sorted(map(str, data)))}); expected {expected}.')
  unknown = sorted(str(k) for k in data if k not in _TRAINER_KEYS)
  if unknown:
    raise TorchImportError(f'{path}: unknown key {unknown[0]!r} in a Trainer checkpoint '
                           f'(known: {", ".join(_TRAINER_KEYS)}).')
  missing = [k for k in _TRAINER_REQUIRED if k not in data]
  if missing:
    raise TorchImportError(f'{path}: missing key {missing[0]!r} of a Trainer checkpoint '
                           '(Trainer.save writes step, model, opt, ema, scaler, version).')
  model = data['model']
  if not isinstance(model, Mapping) or not _is_state_dict(model):
    raise TorchImportError(f'{path}: key \'model\' holds a {type(model).__name__}, not the '
                           'GaussianDiffusion state_dict of tensors.')
  return _Parts('trainer', model, _DIFFUSION_UNET_PREFIX, step=int(data['step']),
                opt=data.get('opt'), ema=data.get('ema'), scaler=data.get('scaler'),
                version=data.get('version'))


def _refuse_unsupported_version(parts: _Parts, path: str) -> None:
  """Refuses 2.x (by its version string or an RMSNorm key in a ResNet block)."""
  version = parts.version
  if version is not None and str(version).split('.')[0] != '1':
    raise TorchImportError(
        f'{path} was written by denoising-diffusion-pytorch {version}; supported: '
        f'{SUPPORTED_VERSIONS}. 2.x replaced GroupNorm by RMSNorm in the U-Net\'s ResNet '
        'blocks, which this project\'s U-Net (the 1.10.12 one) does not have. Train with '
        'the library pinned to 1.10.12 to import its checkpoints.')
  norm = next((k for k in parts.model if _V2_BLOCK_NORM.search(k)), None)
  if norm is not None:
    raise TorchImportError(
        f'{path}: key {norm!r} is an RMSNorm gain in a ResNet block, as in '
        f'denoising-diffusion-pytorch 2.x (version {version or "not recorded"}); '
        f'supported: {SUPPORTED_VERSIONS}, whose ResNet blocks use GroupNorm '
        '(block1.norm.weight and .bias).')


# ---------------------------------------------------------------------------------------
# The U-Net's settings from its shapes.

def _shape(sd: Mapping[str, Any], key: str, prefix: str, path: str) -> tuple[int, ...]:
  if key not in sd:
    raise TorchImportError(f'{path}: missing key {prefix + key!r}, which every '
                           'denoising-diffusion-pytorch 1.10.12 Unet has.')
  return tuple(sd[key].shape)


def _shape_error(path: str, key: str, shape: tuple, why: str) -> TorchImportError:
  return TorchImportError(f'{path}: key {key!r} has shape {tuple(shape)}, which fits no '
                          f'denoising-diffusion-pytorch 1.10.12 Unet ({why}).')


def _num_stages(sd: Mapping[str, Any]) -> int:
  stages = {int(k.split('.')[1]) for k in sd
            if k.startswith('downs.') and k.split('.')[1].isdigit()}
  return max(stages) + 1 if stages else 0


def _attention(sd, name: str, prefix: str, path: str) -> tuple[bool, int, int]:
  """(full, heads, dim_head) of the attention `name` (e.g. 'downs.1.2')."""
  key = f'{name}.mem_kv'
  mem = _shape(sd, key, prefix, path)
  linear = f'{name}.to_out.1.g' in sd
  if len(mem) != 4 or mem[0] != 2:
    raise _shape_error(path, prefix + key, mem, 'memory key/values are [2, heads, ., .]')
  # Memory: LinearAttention's is [2, heads, dim_head, M], Attention's [2, heads, M, d].
  heads = mem[1]
  dim_head, num_mem = (mem[2], mem[3]) if linear else (mem[3], mem[2])
  if num_mem != unet.UNet.num_mem_kv:
    raise _shape_error(path, prefix + key, mem,
                       f'the library has {unet.UNet.num_mem_kv} memory key/values')
  return not linear, heads, dim_head


def _per_stage_value(values: list[int]) -> int | tuple[int, ...]:
  return values[0] if len(set(values)) == 1 else tuple(values)


def infer_unet_config(sd: Mapping[str, Any], *, prefix: str = '', path: str = '') -> dict:
  """The `model` config fields of a library Unet, read from its state_dict's shapes.

  Reads dim, dim_mults, channels, self_condition, attn_heads, attn_dim_head and
  full_attn. Not readable, so left to the base config: resnet_block_groups (GroupNorm
  groups have no parameters of their own; the library's default is 8) and the time
  embedding's theta (10000, the library's default).

  Args:
    sd: the Unet's keys (prefix removed) -> tensors or arrays.
    prefix: the keys' prefix in the file, for messages ('model.' in a Trainer checkpoint).
    path: the file, for messages.

  Returns:
    A dict of `model` config fields.
  Raises:
    TorchImportError: a missing key, a shape no 1.10.12 Unet has, or a variant this
      project does not implement (learned variance, learned/random Fourier time
      features, init_dim != dim); the message names the key.
  """
  learned_time = sorted(k for k in sd if k.startswith('time_mlp.0.'))
  if learned_time:
    raise TorchImportError(
        f'{path}: key {prefix + learned_time[0]!r} belongs to learned or random Fourier '
        'time features (learned_sinusoidal_cond / random_fourier_features), which this '
        'project\'s U-Net does not implement; only the sinusoidal time embedding imports.')
  time_key = 'time_mlp.1.weight'
  time_shape = _shape(sd, time_key, prefix, path)
  dim = time_shape[1]
  if time_shape[0] != unet.UNet.time_dim_mult * dim:
    raise _shape_error(path, prefix + time_key, time_shape,
                       f'the time MLP maps dim to {unet.UNet.time_dim_mult} x dim')
  init_shape = _shape(sd, _UNET_STEM, prefix, path)
  if init_shape[0] != dim:
    raise TorchImportError(
        f'{path}: key {prefix + _UNET_STEM!r} has shape {init_shape}: init_dim='
        f'{init_shape[0]} differs from dim={dim}, which the model config cannot express '
        '(it has no init_dim); only Unets with the default init_dim import.')
  final_key = 'final_conv.weight'
  out_dim = _shape(sd, final_key, prefix, path)[0]
  in_channels = init_shape[1]
  if in_channels == out_dim:
    channels, self_condition = out_dim, False
  elif in_channels == 2 * out_dim:
    channels, self_condition = out_dim, True
  elif out_dim == 2 * in_channels:
    raise TorchImportError(
        f'{path}: key {prefix + final_key!r} has {out_dim} output channels for '
        f'{in_channels} input channels: a learned-variance Unet (learned_variance=True, '
        'for LearnedGaussianDiffusion). This project\'s diffusion predicts the mean only; '
        'such checkpoints do not import.')
  else:
    raise _shape_error(path, prefix + final_key, _shape(sd, final_key, prefix, path),
                       f'{out_dim} output channels for {in_channels} input channels')

  num_stages = _num_stages(sd)
  if num_stages == 0:
    _shape(sd, 'downs.0.0.block1.proj.weight', prefix, path)  # Raises: missing.
  dim_mults = []
  for i in range(num_stages):
    # The last stage keeps its resolution with a 3x3 conv; the others pixel-unshuffle.
    key = f'downs.{i}.3.weight' if i == num_stages - 1 else f'downs.{i}.3.1.weight'
    shape = _shape(sd, key, prefix, path)
    if shape[0] % dim:
      raise _shape_error(path, prefix + key, shape,
                         f'stage {i} has {shape[0]} channels, not a multiple of dim={dim}')
    dim_mults.append(shape[0] // dim)

  stages = [_attention(sd, f'downs.{i}.2', prefix, path) for i in range(num_stages)]
  full_attn = tuple(full for full, _, _ in stages)
  mid_full, mid_heads, mid_dim_head = _attention(sd, 'mid_attn', prefix, path)
  # The middle attention is always full and uses the innermost stage's heads.
  if not mid_full or (mid_heads, mid_dim_head) != stages[-1][1:]:
    mem_key = prefix + 'mid_attn.mem_kv'
    raise _shape_error(path, mem_key, _shape(sd, 'mid_attn.mem_kv', prefix, path),
                       f'the middle attention is full attention with the innermost '
                       f'stage\'s {stages[-1][1]} heads of {stages[-1][2]} channels')
  library_default = (False,) * (num_stages - 1) + (True,)
  return dict(
      dim=dim, dim_mults=tuple(dim_mults), channels=channels,
      self_condition=self_condition,
      attn_heads=_per_stage_value([heads for _, heads, _ in stages]),
      attn_dim_head=_per_stage_value([dim_head for _, _, dim_head in stages]),
      # () is the config's way to say "the library's default".
      full_attn=() if full_attn == library_default else full_attn)


def _torch_shapes(abstract_params: Any) -> dict[str, tuple[int, ...]]:
  """torch key -> shape of the library Unet whose params have these abstract shapes."""
  # Zero-stride views: the converter only permutes axes, it never reads values.
  views = jax.tree.map(lambda a: np.broadcast_to(np.zeros((), np.float32), a.shape),
                       abstract_params)
  return {k: v.shape for k, v in torch_convert.unet_params_to_torch(views).items()}


def _check_unet_shapes(sd: Mapping[str, Any], abstract_params: Any, prefix: str,
                       path: str, model_fields: dict) -> None:
  """Every key and shape of `sd` equals those of the U-Net built from `model_fields`."""
  expected = _torch_shapes(abstract_params)
  unknown = [k for k in sd if k not in expected]
  if unknown:
    raise TorchImportError(
        f'{path}: unknown key {prefix + unknown[0]!r} ({len(unknown)} unknown in all) for '
        f'a denoising-diffusion-pytorch 1.10.12 Unet with {model_fields}. Is the file '
        'from another version or a modified Unet?')
  missing = [k for k in expected if k not in sd]
  if missing:
    raise TorchImportError(
        f'{path}: missing key {prefix + missing[0]!r} ({len(missing)} missing in all) '
        f'of a denoising-diffusion-pytorch 1.10.12 Unet with {model_fields}.')
  for key, shape in expected.items():
    if tuple(sd[key].shape) != shape:
      raise _shape_error(path, prefix + key, tuple(sd[key].shape),
                         f'a Unet with {model_fields} has {shape} there')


# ---------------------------------------------------------------------------------------
# The diffusion's settings from its buffers.

def match_schedule(betas: np.ndarray, diffusion_config: ml_collections.ConfigDict
                   ) -> str | None:
  """The named schedule whose betas (with the config's parameters) equal `betas`.

  Args:
    betas: [T] betas as the library stores them (float32).
    diffusion_config: the `diffusion` group; its cosine_s and sigmoid_* parameters.

  Returns:
    'linear', 'cosine' or 'sigmoid', or None when none matches to float32 rounding.
  """
  betas = np.asarray(betas, np.float64)
  for name in schedules.SCHEDULES:
    reference = _named_schedule(diffusion_config, name, betas.shape[0]).betas
    if np.allclose(betas, reference, rtol=_BETAS_RTOL, atol=0.0):
      return name
  return None


def _named_schedule(diffusion_config: ml_collections.ConfigDict, name: str,
                    timesteps: int) -> schedules.Schedule:
  """The schedule `name` with T = timesteps and the config's schedule parameters."""
  candidate = ml_collections.ConfigDict(diffusion_config.to_dict())
  candidate.schedule, candidate.timesteps = name, timesteps
  return train_step_lib.create_schedule(candidate)


def _float32_shortest(value: float) -> float:
  """The shortest decimal that rounds to float32(value): 5.3, not 5.300000190734863."""
  return float(str(np.float32(value)))


def infer_objective(loss_weight: np.ndarray, schedule: schedules.Schedule
                    ) -> tuple[str, float] | None:
  """The objective and min-SNR gamma whose GaussianDiffusion loss weight is `loss_weight`.

  1.10.12 weights: pred_noise 1, pred_x0 snr, pred_v snr / (snr + 1); min-SNR weighting
  multiplies them by min(snr, gamma) / snr, so gamma is recovered where snr > gamma.

  Args:
    loss_weight: [T] the stored buffer.
    schedule: the float64 schedule of the same betas.

  Returns:
    (objective, gamma), gamma 0.0 when min-SNR weighting is off (or clips nothing), or
    None when no objective fits.
  """
  weight = np.asarray(loss_weight, np.float64)
  for objective in schedules.OBJECTIVES:
    plain = schedules.loss_weight(schedule, objective)
    if np.allclose(weight, plain, rtol=_LOSS_WEIGHT_RTOL, atol=0.0):
      return objective, 0.0
    ratio = weight / plain  # min(snr, gamma) / snr under min-SNR weighting.
    clipped = ratio < 1 - _LOSS_WEIGHT_RTOL
    if not clipped.any() or np.any(ratio > 1 + _LOSS_WEIGHT_RTOL):
      continue
    gamma = _float32_shortest(np.median(ratio[clipped] * schedule.snr[clipped]))
    if np.allclose(weight, schedules.loss_weight(schedule, objective, gamma),
                   rtol=_LOSS_WEIGHT_RTOL, atol=0.0):
      return objective, gamma
  return None


def _float64(value: Any) -> np.ndarray:
  """A torch tensor (any float dtype, bfloat16 too) or array -> float64 numpy."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch here.
    value = value.detach().cpu().double().numpy()
  return np.asarray(value, np.float64)


def _diffusion_settings(parts: _Parts, base: ml_collections.ConfigDict, path: str,
                        notes: list[str]) -> tuple[dict, np.ndarray | None]:
  """(`diffusion` config fields, custom betas or None) from the stored buffers."""
  buffers = {k: v for k, v in parts.model.items() if not k.startswith(parts.unet_prefix)}
  if parts.source == 'unet':
    notes.append(f'A bare Unet state_dict holds no diffusion buffers: schedule '
                 f'{base.diffusion.schedule!r}, T={base.diffusion.timesteps} and objective '
                 f'{base.diffusion.objective!r} come from the base config.')
    return {}, None
  unknown = sorted(k for k in buffers if k not in _DIFFUSION_BUFFERS)
  if unknown:
    raise TorchImportError(f'{path}: unknown key {unknown[0]!r} in the GaussianDiffusion '
                           f'state_dict (its buffers are {", ".join(_DIFFUSION_BUFFERS)}).')
  missing = [k for k in _DIFFUSION_BUFFERS if k not in buffers]
  if missing:
    raise TorchImportError(f'{path}: missing key {missing[0]!r} of the GaussianDiffusion '
                           'state_dict (1.10.12 stores its schedule tables and '
                           'loss_weight).')
  arrays = {k: _float64(v) for k, v in buffers.items()}
  betas = arrays['betas']
  for key, value in arrays.items():
    if value.ndim != 1 or value.shape != betas.shape or not betas.size:
      raise _shape_error(path, key, value.shape, f'every buffer is [T], betas is '
                         f'{betas.shape}')
  timesteps = betas.shape[0]
  name = match_schedule(betas, base.diffusion)
  custom = None
  if name is None:
    name, custom = schedules.CUSTOM_SCHEDULE, betas
    notes.append(f'The betas match no named schedule with the base config\'s parameters; '
                 f'kept as they are stored (float32) in {BETAS_FILE}.')
  try:
    schedule = (schedules.schedule_from_betas(custom) if custom is not None else
                _named_schedule(base.diffusion, name, timesteps))
  except ValueError as e:
    raise TorchImportError(f'{path}: key \'betas\' holds no valid schedule: {e}') from e
  found = infer_objective(arrays['loss_weight'], schedule)
  if found is None:
    raise TorchImportError(
        f'{path}: key \'loss_weight\' (from {arrays["loss_weight"].min():g} to '
        f'{arrays["loss_weight"].max():g}) fits no objective '
        f'({", ".join(schedules.OBJECTIVES)}, with or without min-SNR weighting) of the '
        f'stored {name} schedule.')
  objective, gamma = found
  if gamma:
    notes.append(f'min-SNR loss weighting with gamma={gamma} (recovered from loss_weight).')
  return dict(schedule=name, timesteps=timesteps, objective=objective,
              min_snr_gamma=gamma), custom


# ---------------------------------------------------------------------------------------
# The optimizer: torch Adam -> optax AdamW.

def _adam(parts: _Parts, unet_keys: list[str], path: str, notes: list[str]
          ) -> tuple[dict, dict, dict, int] | None:
  """(optim config fields, exp_avg and exp_avg_sq per Unet key, Adam step) or None."""
  opt = parts.opt
  if opt is None:
    notes.append('No optimizer state: AdamW starts afresh with the base config\'s '
                 'settings.')
    return None
  for key in ('state', 'param_groups'):
    if key not in opt:
      raise TorchImportError(f'{path}: missing key \'opt.{key}\' of the torch optimizer '
                             'state_dict.')
  groups = opt['param_groups']
  settings = ('lr', 'betas', 'eps', 'weight_decay')
  for group in groups[1:]:
    for name in settings:
      if group[name] != groups[0][name]:
        raise TorchImportError(f'{path}: opt.param_groups differ in {name!r} '
                               f'({groups[0][name]} vs {group[name]}); the config holds '
                               'one set of optimizer settings.')
  group = groups[0]
  if group.get('maximize', False):
    raise TorchImportError(f'{path}: opt.param_groups[0].maximize=True; this project '
                           'minimises its loss.')
  if group.get('amsgrad', False):
    notes.append('AMSGrad\'s max_exp_avg_sq is dropped: AdamW continues without it.')
  if group['weight_decay'] and not group.get('decoupled_weight_decay', False):
    notes.append(f'torch Adam\'s weight_decay={group["weight_decay"]} is L2 on the '
                 'gradient; it continues as AdamW\'s decoupled weight decay.')
  indices = [index for g in groups for index in g['params']]
  if len(indices) != len(unet_keys):
    raise TorchImportError(f'{path}: opt.param_groups list {len(indices)} parameters, but '
                           f'the model has {len(unet_keys)}: not this model\'s optimizer.')
  exp_avg, exp_avg_sq, counts = {}, {}, set()
  for index, key in zip(indices, unet_keys):
    state = opt['state'].get(index)
    shape = tuple(parts.model[parts.unet_prefix + key].shape)
    if state is None:  # Never stepped (no gradient yet): torch would start at zero.
      exp_avg[key] = exp_avg_sq[key] = np.zeros(shape, np.float32)
      continue
    for name, target in (('exp_avg', exp_avg), ('exp_avg_sq', exp_avg_sq)):
      if name not in state:
        raise TorchImportError(f'{path}: missing key \'opt.state.{index}.{name}\' (Adam '
                               f'moment of {parts.unet_prefix + key}).')
      if tuple(state[name].shape) != shape:
        raise _shape_error(path, f'opt.state.{index}.{name}', tuple(state[name].shape),
                           f'it is the Adam moment of {parts.unet_prefix + key}, {shape}')
      target[key] = state[name]
    if 'step' not in state:
      raise TorchImportError(f'{path}: missing key \'opt.state.{index}.step\' (Adam step '
                             f'of {parts.unet_prefix + key}).')
    counts.add(int(state['step']))
  if len(counts) > 1:
    raise TorchImportError(f'{path}: the Adam step counts differ between parameters '
                           f'({sorted(counts)}); optax keeps one count.')
  beta1, beta2 = group['betas']
  fields = dict(learning_rate=float(group['lr']), b1=float(beta1), b2=float(beta2),
                eps=float(group['eps']), weight_decay=float(group['weight_decay']))
  return fields, exp_avg, exp_avg_sq, counts.pop() if counts else 0


def _with_adam_state(opt_state: Any, mu: Any, nu: Any, adam_count: int, step: int) -> Any:
  """opt_state with Adam's moments and count, and the schedule's count at `step`."""
  def replace(node):
    if isinstance(node, optax.ScaleByAdamState):
      return node._replace(count=jnp.asarray(adam_count, node.count.dtype), mu=mu, nu=nu)
    if isinstance(node, optax.ScaleByScheduleState):
      return node._replace(count=jnp.asarray(step, node.count.dtype))
    return node
  is_state = lambda n: isinstance(n, (optax.ScaleByAdamState, optax.ScaleByScheduleState))
  return jax.tree.map(replace, opt_state, is_leaf=is_state)


# ---------------------------------------------------------------------------------------
# EMA, checks and writing the run.

def _ema_params(parts: _Parts, abstract_params: Any, path: str, model_fields: dict,
                notes: list[str]) -> dict | None:
  """The EMA U-Net's params of a Trainer checkpoint's `ema` (None: there are none)."""
  ema = parts.ema
  if parts.source != 'trainer' or ema is None:
    return None
  unknown = sorted(k for k in ema
                   if k not in _EMA_BUFFERS and not k.startswith(_EMA_MODEL_PREFIXES))
  if unknown:
    raise TorchImportError(f'{path}: unknown key \'ema.{unknown[0]}\' in the ema_pytorch '
                           f'EMA state_dict (known: {", ".join(_EMA_BUFFERS)}, '
                           f'{", ".join(p + "*" for p in _EMA_MODEL_PREFIXES)}).')
  ema_sd = {k[len(_EMA_UNET_PREFIX):]: v for k, v in ema.items()
            if k.startswith(_EMA_UNET_PREFIX)}
  if not ema_sd:
    raise TorchImportError(f'{path}: missing key \'ema.{_EMA_UNET_PREFIX}{_UNET_STEM}\': '
                           'the EMA holds no U-Net weights.')
  _check_unet_shapes(ema_sd, abstract_params, 'ema.' + _EMA_UNET_PREFIX, path, model_fields)
  if 'step' in ema and int(ema['step']) != parts.step:
    # train_step derives the EMA decay from state.step, the optimizer step.
    notes.append(f'The EMA update counter ({int(ema["step"])}) differs from the step '
                 f'({parts.step}); the EMA schedule continues as after {parts.step} '
                 'updates.')
  return torch_convert.unet_params_from_torch(ema_sd)


def _check_config(config: ml_collections.ConfigDict, path: str) -> None:
  """config_check's model and diffusion checks, before anything is written."""
  checked = ml_collections.ConfigDict(config.to_dict())
  if checked.diffusion.schedule == schedules.CUSTOM_SCHEDULE:
    # Its betas passed schedule_from_betas already; their file is written last.
    checked.diffusion.schedule = next(iter(schedules.SCHEDULES))
  try:
    config_check.check_model_and_diffusion(checked)
  except config_check.ConfigError as e:
    raise TorchImportError(f'{path}: the imported settings make no valid run: {e}') from e


def _check_like(state: Any, abstract: Any) -> None:
  """The state has the structure, shapes and dtypes training restores into."""
  def describe(tree):
    leaves = jax.tree.leaves(tree)
    return jax.tree.structure(tree), [(tuple(a.shape), np.dtype(a.dtype)) for a in leaves]

  if describe(state) != describe(abstract):
    raise RuntimeError('torch_import built a TrainState unlike create_train_state\'s; '
                       'please report this as a bug.')


def _config_header(path: str, parts: _Parts, workdir: str,
                   config: ml_collections.ConfigDict) -> str:
  """The docstring of the written config file."""
  config_path = os.path.join(os.path.abspath(workdir), CONFIG_FILE)
  command = (f'python -m eo_ddpm_jax.main --config={config_path} '
             f'--workdir={os.path.abspath(workdir)}')
  text = (
      'Run imported from a denoising-diffusion-pytorch checkpoint by\n'
      'eo_ddpm_jax.torch_import.\n\n'
      f'Source: {os.path.abspath(path)}\n'
      f'({parts.source}, version {parts.version or "not recorded"}, step {parts.step}).\n\n'
      'Read from the checkpoint: the model group (dim, dim_mults, channels,\n'
      'self_condition, attention); diffusion (schedule, timesteps, objective,\n'
      'min_snr_gamma) unless it is a bare Unet; optim (Adam\'s lr, b1, b2, eps,\n'
      'weight_decay, as a constant learning rate like the Trainer\'s) when it holds the\n'
      'optimizer. Not in the checkpoint, so from the base config: data.image_size\n'
      f'({config.data.image_size}), model.resnet_block_groups '
      f'({config.model.resnet_block_groups}), the EMA settings, gradient\n'
      'clipping and the data, train and sample groups.\n\n'
      f'Sample:   {command} --mode=sample\n'
      f'Continue: {command} --config.data.data_dir=<TFDS dir> '
      f'--config.train.max_steps=<more than {parts.step}>\n')
  return text.replace('\\', '\\\\').replace('"""', "'''")


def _config_source(config_dict: dict, header: str, custom_betas: bool) -> str:
  """A self-contained ml_collections config file that returns `config_dict`."""
  literal = pprint.pformat(config_dict, indent=1, width=88, sort_dicts=False)
  betas_line = ''
  if custom_betas:  # Beside this file, wherever the workdir is moved.
    betas_line = (f'  config.diffusion.betas_file = os.path.join(\n'
                  f'      os.path.dirname(os.path.abspath(__file__)), {BETAS_FILE!r})\n')
  return (f'"""{header}"""\n\nimport os\n\nimport ml_collections\n\n'
          f'_CONFIG = {literal}\n\n\n'
          'def get_config() -> ml_collections.ConfigDict:\n'
          '  config = ml_collections.ConfigDict(_CONFIG)\n'
          f'{betas_line}  return config\n')


def _write_text(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _train_state(parts: _Parts, unet_sd: dict, config: ml_collections.ConfigDict,
                 model_fields: dict, path: str, notes: list[str]
                 ) -> tuple[train_step_lib.TrainState, dict]:
  """The TrainState to save, and the optim config fields read from the torch Adam.

  Its structure, shapes and dtypes are those `create_train_state` gives for `config`,
  which is what training and sampling restore into.
  """
  model = train_step_lib.create_model(config.model)
  # The opt state's structure needs a schedule callable, not its values.
  tx = train_step_lib.create_optimizer(config.optim, optax.constant_schedule(0.0))
  image_shape = (config.data.image_size, config.data.image_size, config.model.channels)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(functools.partial(
      train_step_lib.create_train_state, config, model, tx, image_shape=image_shape), rng)
  _check_unet_shapes(unet_sd, abstract.params, parts.unet_prefix, path, model_fields)
  params = jax.tree.map(jnp.asarray, torch_convert.unet_params_from_torch(unet_sd))
  ema_params = _ema_params(parts, abstract.params, path, model_fields, notes)
  if ema_params is None:
    notes.append(f'No EMA weights: the EMA starts as a copy of the weights at step '
                 f'{parts.step}.')
    ema_params = params
  # Zeros of the right structure without running tx.init (one compile per leaf shape).
  opt_state = jax.tree.map(lambda a: jnp.asarray(np.zeros(a.shape, a.dtype)),
                           abstract.opt_state)
  adam = _adam(parts, list(unet_sd), path, notes)
  optim_fields = {}
  if adam is not None:
    optim_fields, exp_avg, exp_avg_sq, adam_count = adam
    mu, nu = (jax.tree.map(jnp.asarray, torch_convert.unet_params_from_torch(moment))
              for moment in (exp_avg, exp_avg_sq))
    opt_state = _with_adam_state(opt_state, mu, nu, adam_count, parts.step)
  state = train_step_lib.TrainState(
      step=jnp.asarray(parts.step, abstract.step.dtype), params=params,
      ema_params=jax.tree.map(jnp.asarray, ema_params), opt_state=opt_state,
      # The step-noise key a fresh run of this seed would use (create_train_state).
      rng=jax.random.split(rng)[1])
  _check_like(state, abstract)
  return state, optim_fields


def _default_base_config() -> ml_collections.ConfigDict:
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('No base config given and configs/default.py is not importable: '
                      'run from the repository root or pass base_config (--config).') from e
  return default.get_config()


def import_trainer_checkpoint(path: str, workdir: str, *,
                              base_config: ml_collections.ConfigDict | None = None,
                              image_size: int | None = None,
                              step: int | None = None) -> ImportResult:
  """Imports a denoising-diffusion-pytorch 1.x checkpoint into `workdir`.

  Args:
    path: a Trainer checkpoint (`model-N.pt`), or a GaussianDiffusion or Unet state_dict
      saved with torch.save.
    workdir: the run directory to create; it must hold no checkpoints yet.
    base_config: supplies what the checkpoint does not hold (see the module docstring);
      default configs/default.py.
    image_size: training image side in pixels (not stored in weights); default the base
      config's data.image_size (128 in configs/default.py).
    step: step number for a bare state_dict (default 0); a Trainer checkpoint has its own.

  Returns:
    An ImportResult; the config is also `<workdir>/config.py`.
  Raises:
    FileNotFoundError: no file at `path`.
    TorchImportError: the file is not an importable 1.x checkpoint, or workdir already
      holds checkpoints; the message names the key or file and the fix.
  """
  base = base_config if base_config is not None else _default_base_config()
  notes = []
  parts = _parts(load_checkpoint(path), path)
  _refuse_unsupported_version(parts, path)
  if parts.version is not None and str(parts.version) != _TESTED_VERSION:
    notes.append(f'Written by version {parts.version}; tested with {_TESTED_VERSION}.')
  if step is not None:
    if parts.source == 'trainer':
      raise TorchImportError(f'{path} is a Trainer checkpoint at step {parts.step}: do not '
                             'pass a step for it.')
    parts.step = step
  if parts.step < 0:
    raise TorchImportError(f'{path}: step {parts.step} is negative.')

  # --- The U-Net and the diffusion, inferred; the config they make.
  unet_sd = {k[len(parts.unet_prefix):]: v for k, v in parts.model.items()
             if k.startswith(parts.unet_prefix)}
  model_fields = infer_unet_config(unet_sd, prefix=parts.unet_prefix, path=path)
  if model_fields['self_condition']:
    notes.append('A self-conditioning Unet: this project\'s samplers and training feed '
                 'zeros as the self-condition, so its samples differ from the library\'s.')
  diffusion_fields, custom_betas = _diffusion_settings(parts, base, path, notes)
  config_dict = base.to_dict()
  config_dict['model'].update(model_fields)
  config_dict['diffusion'].update(diffusion_fields, betas_file='')
  config_dict['data']['image_size'] = int(image_size or base.data.image_size)
  config = ml_collections.ConfigDict(config_dict)
  _check_config(config, path)

  # --- Params, EMA and optimizer state, checked against the model the config builds.
  state, optim_fields = _train_state(parts, unet_sd, config, model_fields, path, notes)
  if optim_fields:
    # The Trainer's learning rate is constant: a cosine "decay" from lr to lr.
    lr = optim_fields['learning_rate']
    optim_fields.update(warmup_steps=0, warmup_init_learning_rate=lr, end_learning_rate=lr)
    config_dict['optim'].update(optim_fields)
    config.optim.update(optim_fields)
  if parts.scaler is not None:
    notes.append('The AMP GradScaler state is dropped (bfloat16 needs no loss scaling).')

  # --- Write: betas and config first, the checkpoint (atomic) last.
  manager = checkpoints.create_manager(workdir, config.train, steps_per_epoch=1)
  config_path = os.path.join(workdir, CONFIG_FILE)
  written = []
  try:
    if manager.all_steps():
      raise TorchImportError(f'{workdir} already holds checkpoints (steps '
                             f'{sorted(manager.all_steps())}); import into a fresh '
                             '--workdir.')
    if custom_betas is not None:
      config.diffusion.betas_file = os.path.join(os.path.abspath(workdir), BETAS_FILE)
      written.append(config.diffusion.betas_file)
      np.save(config.diffusion.betas_file, custom_betas)
    header = _config_header(path, parts, workdir, config)
    written.append(config_path)
    _write_text(config_path, _config_source(config_dict, header, custom_betas is not None))
    # config.json too, as training writes it: --mode=report names runs by its schedule.
    written.append(os.path.join(workdir, run_config.CONFIG_FILE))
    run_config.save_config(config, workdir)
    checkpoint_path = checkpoints.save(manager, parts.step, state, None)
  except BaseException:
    # A config without its checkpoint would train from scratch: leave neither.
    for file in written:
      if os.path.exists(file):
        os.remove(file)
    raise
  finally:
    manager.close()
  for note in notes:
    logging.warning('import_torch: %s', note)
  logging.info('Imported %s (%s, step %d) into %s.', path, parts.source, parts.step,
               checkpoint_path)
  return ImportResult(config=config, config_path=config_path,
                      checkpoint_path=checkpoint_path, step=parts.step,
                      source=parts.source, notes=tuple(notes))
