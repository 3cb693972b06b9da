"""Weight conversion between denoising-diffusion-pytorch 1.10.12's `Unet` and `unet.UNet`.

This module owns the key and layout mapping only; it needs numpy, not torch (torch
tensors are accepted and turned into numpy arrays). Layouts:

- conv kernels OIHW <-> HWIO; linear weights [out, in] <-> [in, out];
- RMSNorm gains g [1, C, 1, 1] <-> [C]; GroupNorm weight <-> scale;
- memory key/values: `Attention` [2, heads, M, d] and `LinearAttention`
  [2, heads, d, M] <-> [2, M, heads, d];
- the pixel-unshuffle downsample's 1x1 kernel: input channels (c, p1, p2) <-> (p1, p2, c).

The architecture (number of stages, linear or full attention per layer, residual 1x1
convs) is read from the keys, so no config is needed; shapes are checked when the
params are applied.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

# (torch leaf, flax leaf, layout) of each kind of leaf module.
_CONV = (('weight', 'kernel', 'conv'), ('bias', 'bias', 'id'))
_UNSHUFFLE_CONV = (('weight', 'kernel', 'unshuffle_conv'), ('bias', 'bias', 'id'))
_LINEAR = (('weight', 'kernel', 'linear'), ('bias', 'bias', 'id'))
_GROUP_NORM = (('weight', 'scale', 'id'), ('bias', 'bias', 'id'))
_STEM_KEY = 'init_conv.weight'  # Present in every Unet.


def _to_numpy(value: Any) -> np.ndarray:
  """A torch tensor or array-like -> numpy array (bfloat16 tensors via float32)."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch.
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _unshuffle_to_flax(w: np.ndarray) -> np.ndarray:
  out, in4 = w.shape[:2]
  w = w.reshape(out, in4 // 4, 2, 2)  # [O, c, p1, p2]
  return w.transpose(2, 3, 1, 0).reshape(1, 1, in4, out)  # [1, 1, (p1 p2 c), O]


def _unshuffle_to_torch(k: np.ndarray) -> np.ndarray:
  in4, out = k.shape[2:]
  k = k.reshape(2, 2, in4 // 4, out)  # [p1, p2, c, O]
  return k.transpose(3, 2, 0, 1).reshape(out, in4, 1, 1)


# layout -> (torch -> flax, flax -> torch)
_LAYOUTS = {
    'id': (lambda a: a, lambda a: a),
    'conv': (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    'linear': (lambda a: a.T, lambda a: a.T),
    'gain': (lambda a: a.reshape(-1), lambda a: a.reshape(1, -1, 1, 1)),
    'mem_kv_full': (lambda a: a.transpose(0, 2, 1, 3), lambda a: a.transpose(0, 2, 1, 3)),
    'mem_kv_linear': (lambda a: a.transpose(0, 3, 1, 2), lambda a: a.transpose(0, 2, 3, 1)),
    'unshuffle_conv': (_unshuffle_to_flax, _unshuffle_to_torch),
}


def _module(torch_prefix: str, flax_path: tuple, leaves) -> Iterator[tuple]:
  for torch_leaf, flax_leaf, layout in leaves:
    yield f'{torch_prefix}.{torch_leaf}', flax_path + (flax_leaf,), layout


def _resnet(t: str, f: tuple, has_res_conv: bool) -> Iterator[tuple]:
  yield from _module(f'{t}.mlp.1', f + ('mlp',), _LINEAR)
  for block in ('block1', 'block2'):
    yield from _module(f'{t}.{block}.proj', f + (block, 'proj'), _CONV)
    yield from _module(f'{t}.{block}.norm', f + (block, 'norm'), _GROUP_NORM)
  if has_res_conv:
    yield from _module(f'{t}.res_conv', f + ('res_conv',), _CONV)


def _attention(t: str, f: tuple, linear: bool) -> Iterator[tuple]:
  yield f'{t}.norm.g', f + ('norm', 'g'), 'gain'
  yield f'{t}.mem_kv', f + ('mem_kv',), 'mem_kv_linear' if linear else 'mem_kv_full'
  yield f'{t}.to_qkv.weight', f + ('to_qkv', 'kernel'), 'conv'
  if linear:
    yield from _module(f'{t}.to_out.0', f + ('to_out',), _CONV)
    yield f'{t}.to_out.1.g', f + ('to_out_norm', 'g'), 'gain'
  else:
    yield from _module(f'{t}.to_out', f + ('to_out',), _CONV)


def _entries(num_stages: int, is_linear, has_res_conv) -> Iterator[tuple]:
  """All (torch key, flax path, layout) of a Unet.

  `is_linear(torch_attn_prefix)` and `has_res_conv(torch_block_prefix)` describe the
  per-layer choices the architecture leaves open.
  """
  yield from _module('init_conv', ('init_conv',), _CONV)
  yield from _module('time_mlp.1', ('time_mlp_1',), _LINEAR)
  yield from _module('time_mlp.3', ('time_mlp_2',), _LINEAR)
  for part in ('downs', 'ups'):
    for i in range(num_stages):
      t, f = f'{part}.{i}', f'{part}_{i}'
      for k, block in ((0, 'block1'), (1, 'block2')):
        yield from _resnet(f'{t}.{k}', (f'{f}_{block}',), has_res_conv(f'{t}.{k}'))
      yield from _attention(f'{t}.2', (f'{f}_attn',), is_linear(f'{t}.2'))
      last = i == num_stages - 1
      resample = 'downsample' if part == 'downs' else 'upsample'
      if last:  # A plain 3x3 conv keeps the resolution.
        yield from _module(f'{t}.3', (f'{f}_{resample}',), _CONV)
      elif part == 'downs':  # Sequential(Rearrange, Conv2d 1x1).
        yield from _module(f'{t}.3.1', (f'{f}_{resample}',), _UNSHUFFLE_CONV)
      else:  # Sequential(nn.Upsample, Conv2d 3x3).
        yield from _module(f'{t}.3.1', (f'{f}_{resample}',), _CONV)
  yield from _resnet('mid_block1', ('mid_block1',), has_res_conv('mid_block1'))
  yield from _attention('mid_attn', ('mid_attn',), is_linear('mid_attn'))
  yield from _resnet('mid_block2', ('mid_block2',), has_res_conv('mid_block2'))
  yield from _resnet('final_res_block', ('final_res_block',),
                     has_res_conv('final_res_block'))
  yield from _module('final_conv', ('final_conv',), _CONV)


def _num_stages(keys, part: str) -> int:
  indices = {int(k.split('.')[1]) for k in keys
             if k.startswith(part + '.') and k.split('.')[1].isdigit()}
  return max(indices) + 1 if indices else 0


def unet_params_from_torch(state_dict: Mapping[str, Any], *, prefix: str = '',
                           dtype: Any = np.float32) -> dict:
  """Converts a library `Unet` state_dict into `unet.UNet` params.

  Args:
    state_dict: torch key -> tensor or array (e.g. `Unet.state_dict()`). Keys not
      starting with `prefix` are ignored, so a whole GaussianDiffusion or Trainer
      checkpoint can be passed.
    prefix: key prefix of the Unet: '' for a Unet, 'model.' for a GaussianDiffusion,
      'ema.ema_model.model.' for the EMA weights of a Trainer checkpoint's 'ema'.
    dtype: numpy dtype of the result (None keeps each source dtype).

  Returns:
    A nested dict of numpy arrays for `UNet(...).apply({'params': params}, ...)`.

  Raises:
    ValueError: naming a key the Unet needs that is missing, or an unknown key.
  """
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not sd:
    raise ValueError(f'unet_params_from_torch: no key starts with prefix {prefix!r}.')

  def is_linear(t):
    return f'{t}.to_out.1.g' in sd or f'{t}.to_out.0.weight' in sd

  def has_res_conv(t):
    proj = sd.get(f'{t}.block1.proj.weight')
    if proj is None:  # Reported as missing below.
      return any(k.startswith(f'{t}.res_conv.') for k in sd)
    return proj.shape[0] != proj.shape[1]

  num_stages = _num_stages(sd, 'downs')
  entries = list(_entries(num_stages, is_linear, has_res_conv))
  expected = {key for key, _, _ in entries}
  unknown = sorted(set(sd) - expected)
  if unknown:
    stems = sorted(k[:-len(_STEM_KEY)] for k in state_dict if k.endswith(_STEM_KEY))
    hint = f"; the Unet's keys start with {stems[0]!r}: pass it as prefix" if stems else ''
    raise ValueError(f'unet_params_from_torch: unknown key {prefix + unknown[0]!r} '
                     f'({len(unknown)} unknown in all; expected a denoising-diffusion-'
                     f'pytorch 1.10.12 Unet with sinusoidal time embedding{hint}).')
  missing = [key for key, _, _ in entries if key not in sd]
  if missing:
    raise ValueError(f'unet_params_from_torch: missing key {prefix + missing[0]!r} '
                     f'({len(missing)} missing in all) for a {num_stages}-stage Unet.')

  params = {}
  for key, path, layout in entries:
    value = _LAYOUTS[layout][0](_to_numpy(sd[key]))
    if dtype is not None:
      value = value.astype(dtype)
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(value)
  return params


def unet_params_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse: `unet.UNet` params -> a state_dict for the library's `Unet`.

  Args:
    params: the UNet's params (the 'params' collection), jax or numpy arrays.

  Returns:
    torch key -> numpy array, loadable with `Unet.load_state_dict` (after
    `torch.from_numpy`).

  Raises:
    ValueError: naming a param that has no torch counterpart, or one that is missing.
  """
  num_stages = len({k for k in params if k.startswith('downs_') and k.endswith('_attn')})

  def subtree(torch_prefix):
    # The flax module of a torch attention or resnet prefix, named as in `_entries`.
    parts = torch_prefix.split('.')
    if parts[0] in ('downs', 'ups'):
      name = {'0': 'block1', '1': 'block2', '2': 'attn'}[parts[2]]
      return params.get(f'{parts[0]}_{parts[1]}_{name}', {})
    return params.get(torch_prefix, {})

  entries = list(_entries(num_stages,
                          lambda t: 'to_out_norm' in subtree(t),
                          lambda t: 'res_conv' in subtree(t)))
  out, seen = {}, set()
  for key, path, layout in entries:
    node = params
    for name in path:
      if not isinstance(node, Mapping) or name not in node:
        raise ValueError(f'unet_params_to_torch: missing param {"/".join(path)!r}.')
      node = node[name]
    out[key] = np.ascontiguousarray(_LAYOUTS[layout][1](np.asarray(node)))
    seen.add(path)

  def leaves(tree, path=()):
    for name, child in tree.items():
      if isinstance(child, Mapping):
        yield from leaves(child, path + (name,))
      else:
        yield path + (name,)

  unknown = [p for p in leaves(params) if p not in seen]
  if unknown:
    raise ValueError(f'unet_params_to_torch: unknown param {"/".join(unknown[0])!r}.')
  return out
