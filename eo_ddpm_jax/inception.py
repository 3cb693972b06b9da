"""The FID Inception-v3 network in Flax, and its weights from pytorch-fid's file.

FID is defined on the 2048-d pool features of the TensorFlow Inception graph of
2015-12-05; pytorch-fid ports it as torchvision's Inception-v3 with the blocks patched
(`FIDInceptionA`, `FIDInceptionC`, `FIDInceptionE_1`: average pooling that does not count
the padding; `FIDInceptionE_2`: max pooling in the pool branch). This module rebuilds that
network layer for layer, with the same module names, so a pytorch-fid state_dict maps
onto its variables by name: conv weights [O, I, kh, kw] -> kernels [kh, kw, I, O],
BatchNorm weight/bias -> params scale/bias, running mean/var -> batch_stats mean/var.

The input path is pytorch-fid's (resize_input=True, normalize_input=True): images in
[0, 1], resized to 299x299 bilinearly (align_corners=False, no antialiasing), then mapped
to [-1, 1]. The weights file is not downloaded here; pass its path. It is read without
executing pickle code: `torch.load(weights_only=True)` for the .pth, or an .npz written
once by `convert_fid_inception_weights` (then torch is not needed).
"""

import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
# Side length the network is fed at (pytorch-fid resizes every input to it).
INPUT_SIZE = 299
FEATURE_DIM = 2048
# torchvision's BasicConv2d: BatchNorm2d(eps=0.001).
BATCH_NORM_EPSILON = 1e-3
# The classifier of the .pth (1008 classes) is not part of the feature network.
_UNUSED_PREFIXES = ('fc.',)

Variables = dict[str, Any]


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of PyTorch's bilinear resize (align_corners=False, no antialias).

  Source coordinate (o + 0.5) * in / out - 0.5, clamped at 0; the two neighbours are
  clamped at the last pixel. The coordinates are float32 arithmetic, as in torch's CPU
  kernel for float32 images: in float64 they differ by up to 3e-5 when downsampling.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0))
  low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = np.clip(src - low.astype(np.float32), 0, 1).astype(np.float64)
  matrix = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, low), 1 - frac)
  np.add.at(matrix, (rows, high), frac)
  return matrix


def resize_bilinear(images, size: int = INPUT_SIZE):
  """[N, H, W, C] -> [N, size, size, C], as torch F.interpolate(bilinear, align_corners=False)."""
  rows = jnp.asarray(bilinear_resize_matrix(images.shape[1], size), images.dtype)
  cols = jnp.asarray(bilinear_resize_matrix(images.shape[2], size), images.dtype)
  highest = jax.lax.Precision.HIGHEST
  images = jnp.einsum('oh,nhwc->nowc', rows, images, precision=highest)
  return jnp.einsum('pw,nowc->nopc', cols, images, precision=highest)


class BasicConv(nn.Module):
  """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (running stats) -> ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    # HIGHEST: no TF32/bf16 passes on GPUs, so features match the float32 reference.
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=jax.lax.Precision.HIGHEST, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPSILON, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TensorFlow's average pool, kept by pytorch-fid: the zero padding is not counted.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_stride_2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """FIDInceptionA: 1x1, 5x5, double 3x3 and pool branches (35x35 grid)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    branch1x1 = BasicConv(64, (1, 1), name='branch1x1')(x)
    branch5x5 = BasicConv(48, (1, 1), name='branch5x5_1')(x)
    branch5x5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(branch5x5)
    branch3x3dbl = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(branch3x3dbl)
    branch_pool = BasicConv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """torchvision's InceptionB (Mixed_6a): grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    branch3x3dbl = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC: factorised 7x7 branches (17x17 grid)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    branch1x1 = BasicConv(192, (1, 1), name='branch1x1')(x)
    branch7x7 = BasicConv(c7, (1, 1), name='branch7x7_1')(x)
    branch7x7 = BasicConv(c7, **row, name='branch7x7_2')(branch7x7)
    branch7x7 = BasicConv(192, **col, name='branch7x7_3')(branch7x7)
    dbl = BasicConv(c7, (1, 1), name='branch7x7dbl_1')(x)
    dbl = BasicConv(c7, **col, name='branch7x7dbl_2')(dbl)
    dbl = BasicConv(c7, **row, name='branch7x7dbl_3')(dbl)
    dbl = BasicConv(c7, **col, name='branch7x7dbl_4')(dbl)
    dbl = BasicConv(192, **row, name='branch7x7dbl_5')(dbl)
    branch_pool = BasicConv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """torchvision's InceptionD (Mixed_7a): grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = BasicConv(192, (1, 1), name='branch3x3_1')(x)
    branch3x3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(branch3x3)
    branch7x7x3 = BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
    branch7x7x3 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
    branch7x7x3 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
    branch7x7x3 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (avg pool) or FIDInceptionE_2 (max pool, `max_pool=True`), 8x8 grid."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    branch1x1 = BasicConv(320, (1, 1), name='branch1x1')(x)
    branch3x3 = BasicConv(384, (1, 1), name='branch3x3_1')(x)
    branch3x3 = jnp.concatenate([BasicConv(384, **row, name='branch3x3_2a')(branch3x3),
                                 BasicConv(384, **col, name='branch3x3_2b')(branch3x3)], -1)
    dbl = BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
    dbl = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(dbl)
    dbl = jnp.concatenate([BasicConv(384, **row, name='branch3x3dbl_3a')(dbl),
                           BasicConv(384, **col, name='branch3x3dbl_3b')(dbl)], -1)
    if self.max_pool:
      # The FID graph's quirk in its last block: max, not average, pooling.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    branch_pool = BasicConv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's InceptionV3(output_blocks=[3]): images -> 2048-d pool features.

  Call with images [N, H, W, 3] in [0, 1] (any H, W); returns float32 [N, 2048].
  Variables: {'params', 'batch_stats'}; apply with the BatchNorm statistics fixed.
  """

  @nn.compact
  def __call__(self, images):
    x = resize_bilinear(images.astype(jnp.float32))
    x = 2 * x - 1
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_stride_2(x)
    x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_stride_2(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, channels in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                           ('Mixed_6e', 192)):
      x = InceptionC(channels, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)).


def variable_shapes() -> Variables:
  """The network's variables as jax.ShapeDtypeStruct, without allocating them."""
  dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), dummy)


def variables_from_state_dict(state_dict: dict[str, np.ndarray]) -> Variables:
  """pytorch-fid Inception state_dict (name -> array) -> Flax variables.

  Raises:
    ValueError: a key or shape does not fit the network (names the first ones).
  """
  params, batch_stats = {}, {}
  for key, value in state_dict.items():
    if key.startswith(_UNUSED_PREFIXES) or key.endswith('num_batches_tracked'):
      continue
    *path, layer, name = key.split('.')
    value = np.asarray(value, np.float32)
    if layer == 'conv' and name == 'weight':
      tree, leaf, value = params, 'kernel', np.transpose(value, (2, 3, 1, 0))
    elif layer == 'bn' and name in ('weight', 'bias'):
      tree, leaf = params, {'weight': 'scale', 'bias': 'bias'}[name]
    elif layer == 'bn' and name in ('running_mean', 'running_var'):
      tree, leaf = batch_stats, {'running_mean': 'mean', 'running_var': 'var'}[name]
    else:
      raise ValueError(f'unexpected key {key!r} in the FID Inception state_dict')
    for part in path + [layer]:
      tree = tree.setdefault(part, {})
    tree[leaf] = value
  variables = {'params': params, 'batch_stats': batch_stats}
  expected = jax.tree_util.tree_map_with_path(lambda p, s: s.shape, variable_shapes())
  got = jax.tree_util.tree_map_with_path(lambda p, a: a.shape, variables)
  if expected != got:
    expected_paths = {jax.tree_util.keystr(p): s for p, s in
                      jax.tree_util.tree_leaves_with_path(expected, is_leaf=_is_shape)}
    got_paths = {jax.tree_util.keystr(p): s for p, s in
                 jax.tree_util.tree_leaves_with_path(got, is_leaf=_is_shape)}
    diff = sorted(set(expected_paths.items()) ^ set(got_paths.items()))[:4]
    raise ValueError(f'the state_dict does not fit the FID Inception network; first '
                     f'differences (variable, shape): {diff}')
  return variables


def _is_shape(x) -> bool:
  return isinstance(x, tuple)


def _missing_weights_message(path: str, problem: str) -> str:
  return (f'FID Inception weights {path!r} {problem}. Download pytorch-fid\'s file '
          f'{FID_WEIGHTS_URL} and pass its path (or an .npz made from it with '
          f'convert_fid_inception_weights).')


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The FID Inception state_dict from a .pth (needs torch) or .npz, as numpy arrays.

  Raises:
    FileNotFoundError: no such file. ValueError: the file cannot be read as weights.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_weights_message(path, 'do not exist'))
  try:
    if path.endswith('.npz'):
      with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
    import torch  # pylint: disable=g-import-not-at-top
    # weights_only: tensors and containers only, no pickled code is run.
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
    return {key: value.numpy() for key, value in state_dict.items()}
  except ImportError as e:
    raise ImportError(f'reading {path!r} needs torch (the [torch] extra), or convert it '
                      f'to .npz where torch is installed') from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(_missing_weights_message(path, f'are unreadable ({e})')) from e


def load_fid_inception_variables(path: str) -> Variables:
  """Flax variables of FIDInceptionV3 from pytorch-fid's .pth or a converted .npz."""
  state_dict = read_state_dict(path)
  try:
    return variables_from_state_dict(state_dict)
  except ValueError as e:
    raise ValueError(_missing_weights_message(path, f'do not fit the network: {e}')) from e


def convert_fid_inception_weights(pth_path: str, npz_path: str) -> None:
  """Writes pytorch-fid's .pth as an .npz (same keys), so later runs need no torch.

  The .npz is written to a temporary name and renamed, so a partial file never remains.
  """
  state_dict = read_state_dict(pth_path)
  variables_from_state_dict(state_dict)  # Fail now rather than at the first use.
  tmp_path = npz_path + '.tmp.npz'
  np.savez(tmp_path, **state_dict)
  os.replace(tmp_path, npz_path)


def _global_array(values: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """The array whose shards are these host values' slices; every host passes the same."""
  return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def make_feature_fn(variables: Variables, mesh: jax.sharding.Mesh | None = None
                    ) -> Callable[[np.ndarray], jax.Array]:
  """A jitted images [N, H, W, 3] in [0, 1] -> float32 [N, 2048] with these weights.

  Args:
    variables: from load_fid_inception_variables.
    mesh: split the images over its 'data' axis (N divisible by its size; the weights
      replicated), so each device, and each host of a multi-host run, computes only its
      share; every host passes the same images and gets all N features back. None: one
      device.
  """
  network = FIDInceptionV3()
  if mesh is None:
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    # The weights are an argument, not a constant folded into the compiled program.
    apply = jax.jit(network.apply)
    return lambda images: apply(variables, images)

  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.tree_util.tree_map(
      lambda v: _global_array(np.asarray(v), replicated), variables)
  apply = jax.jit(network.apply, out_shardings=replicated)

  def features(images):
    images = np.asarray(images, np.float32)
    if images.shape[0] % mesh.size:
      raise ValueError(f'{images.shape[0]} images cannot be split evenly over the '
                       f'{mesh.size} devices; pass a multiple of {mesh.size}.')
    return apply(variables, _global_array(images, split))
  return features
