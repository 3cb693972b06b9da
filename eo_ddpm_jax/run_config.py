"""The config a run was trained with, saved as `<workdir>/config.json`.

Training writes it when it starts (a resumed run rewrites it), so tools that look at a
finished run (`--mode=report`) know its schedule and settings without the config file
or the command-line overrides that made it.
"""

import json
import os

import ml_collections

from eo_ddpm_jax import config_check

CONFIG_FILE = 'config.json'
# What a run's checkpoints mean: the network's shape and the diffusion they sample.
# (model.dtype and the attention kernels may differ: they change the arithmetic only.)
CHECKPOINT_KEYS = (
    'data.image_size', 'model.dim', 'model.dim_mults', 'model.channels',
    'model.resnet_block_groups', 'model.attn_heads', 'model.attn_dim_head',
    'model.full_attn', 'model.self_condition', 'diffusion.schedule', 'diffusion.timesteps',
    'diffusion.cosine_s', 'diffusion.sigmoid_start', 'diffusion.sigmoid_end',
    'diffusion.sigmoid_tau', 'diffusion.objective', 'diffusion.input_scale')


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `config` as JSON (tuples become lists) to `<workdir>/config.json`.

  Written to a temporary name and renamed, so a half-written file never remains.
  Returns:
    The file's path.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  os.replace(tmp, path)
  return path


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The saved config of the run in `workdir`, or None when it has none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _lookup(config, key: str):
  group, name = key.split('.')
  return config[group][name] if group in config and name in config[group] else None


def checkpoint_mismatches(saved: ml_collections.ConfigDict,
                          config: ml_collections.ConfigDict) -> list[str]:
  """'key: run value vs config value' for each CHECKPOINT_KEYS entry that differs.

  Keys the saved config lacks (older runs) are not compared.
  """
  differences = []
  for key in CHECKPOINT_KEYS:
    ours, theirs = _lookup(config, key), _lookup(saved, key)
    # Through JSON, as the saved config went: tuples become lists.
    if theirs is not None and json.loads(json.dumps(ours)) != theirs:
      differences.append(f'{key}: {theirs!r} in the run vs {ours!r}')
  return differences


def check_matches_run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises config_check.ConfigError naming the CHECKPOINT_KEYS where `config` differs
  from the run's saved config (nothing to compare when the run has none)."""
  saved = load_config(workdir)
  mismatches = checkpoint_mismatches(saved, config) if saved is not None else []
  if mismatches:
    raise config_check.ConfigError(
        f'The config differs from the one {workdir} was trained with '
        f'({os.path.join(workdir, CONFIG_FILE)}): {"; ".join(mismatches)}. Pass the '
        'run\'s settings (its config file and the same --config.* overrides).')
