"""Tests of eo_ddpm_jax.inception against pytorch-fid's real FID Inception network.

The reference features come from tests/data/inception_reference.npz, written by
tests/data/make_inception_reference.py with pytorch-fid 0.3.0 and torchvision 0.29.1 (a
torchvision that cannot be installed beside the project's CPU torch) on random weights:
the conv kernels are regenerated here from the script's seeds, the rest is in the file.
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from eo_ddpm_jax import inception
from tests import cli_helpers

DATA_DIR = os.path.join(os.path.dirname(__file__), 'data')
REFERENCE = os.path.join(DATA_DIR, 'inception_reference.npz')
# float32 through ~95 layers: CPU XLA and torch differ by rounding only.
FEATURE_RTOL = 1e-4


def _reference_script():
  spec = importlib.util.spec_from_file_location(
      'make_inception_reference', os.path.join(DATA_DIR, 'make_inception_reference.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_reference():
  """(pytorch-fid state_dict, images NHWC in [0, 1], their pytorch-fid features)."""
  script = _reference_script()
  with np.load(REFERENCE, allow_pickle=False) as data:
    data = {key: data[key] for key in data.files}
  state_dict = {key[len('bn/'):]: value for key, value in data.items() if key.startswith('bn/')}
  for key, shape in json.loads(str(data['conv_shapes'])).items():
    state_dict[key] = script.random_conv_weight(key, tuple(shape))
  return state_dict, data['images_nhwc'], data['features']


@pytest.fixture(scope='module')
def reference():
  return load_reference()


def test_features_equal_pytorch_fid(reference):
  state_dict, images, expected = reference
  variables = inception.variables_from_state_dict(state_dict)
  features = np.asarray(inception.make_feature_fn(variables)(images))
  assert features.shape == (2, inception.FEATURE_DIM) and features.dtype == np.float32
  error = np.linalg.norm(features - expected) / np.linalg.norm(expected)
  assert error < FEATURE_RTOL
  # Not a degenerate network: the two images have clearly different features.
  assert np.linalg.norm(expected[0] - expected[1]) > 0.1 * np.linalg.norm(expected[0])


_TWO_DEVICE_SCRIPT = """
import json, sys
import numpy as np
from eo_ddpm_jax import inception, train_step
from tests.test_inception import load_reference
state_dict, images, _ = load_reference()
mesh = train_step.make_mesh()
feature_fn = inception.make_feature_fn(inception.variables_from_state_dict(state_dict), mesh)
features = feature_fn(images)
try:
  feature_fn(np.concatenate([images, images[:1]]))
  error = None
except ValueError as e:
  error = str(e)
json.dump({'devices': mesh.size, 'replicated': features.sharding.is_fully_replicated,
           'features': np.asarray(features).tolist(), 'error': error}, open(sys.argv[1], 'w'))
"""


def test_features_split_over_two_devices_equal_pytorch_fid(reference, tmp_path):
  _, _, expected = reference
  got = cli_helpers.run_script_on_cpu_devices(_TWO_DEVICE_SCRIPT, 2, tmp_path / 'result.json')
  # One image per device, and every device holds both images' features afterwards.
  assert got['devices'] == 2 and got['replicated']
  features = np.asarray(got['features'])
  assert np.linalg.norm(features - expected) / np.linalg.norm(expected) < FEATURE_RTOL
  assert got['error'] == ('3 images cannot be split evenly over the 2 devices; pass a '
                          'multiple of 2.')


def test_npz_conversion_round_trip_and_errors(reference, tmp_path):
  torch = pytest.importorskip('torch', reason='needs the [torch] extra')
  state_dict, _, _ = reference
  # A .pth as pytorch-fid ships it: tensors, plus the unused classifier and counters.
  full = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in
          state_dict.items()}
  full['fc.weight'] = torch.zeros(1008, 2048)
  full['Conv2d_1a_3x3.bn.num_batches_tracked'] = torch.tensor(0)
  pth = str(tmp_path / 'weights.pth')
  torch.save(full, pth)
  npz = str(tmp_path / 'weights.npz')
  inception.convert_fid_inception_weights(pth, npz)
  from_pth = inception.load_fid_inception_variables(pth)
  from_npz = inception.load_fid_inception_variables(npz)
  kernel = from_npz['params']['Mixed_6b']['branch7x7_2']['conv']['kernel']
  assert kernel.shape == (1, 7, 128, 128)  # torch [O, I, kh, kw] -> [kh, kw, I, O].
  np.testing.assert_array_equal(
      kernel, np.transpose(state_dict['Mixed_6b.branch7x7_2.conv.weight'], (2, 3, 1, 0)))
  np.testing.assert_array_equal(from_npz['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'],
                                state_dict['Mixed_7c.branch_pool.bn.running_var'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, from_npz)

  with pytest.raises(FileNotFoundError, match='pt_inception-2015-12-05-6726825d.pth'):
    inception.load_fid_inception_variables(str(tmp_path / 'missing.pth'))
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='garbage.pth.*unreadable'):
    inception.load_fid_inception_variables(str(garbage))
  partial = {key: value for key, value in state_dict.items() if 'Mixed_7c' not in key}
  np.savez(tmp_path / 'partial.npz', **partial)
  with pytest.raises(ValueError, match='do not fit.*Mixed_7c'):
    inception.load_fid_inception_variables(str(tmp_path / 'partial.npz'))


@pytest.mark.parametrize('in_shape', [(75, 90), (512, 300), (299, 299)])
def test_resize_equals_torch_bilinear(in_shape):
  torch = pytest.importorskip('torch', reason='needs the [torch] extra')
  images = np.random.default_rng(1).uniform(0, 1, (2,) + in_shape + (3,)).astype(np.float32)
  theirs = torch.nn.functional.interpolate(
      torch.from_numpy(np.transpose(images, (0, 3, 1, 2))), size=(299, 299), mode='bilinear',
      align_corners=False).numpy()
  ours = np.asarray(inception.resize_bilinear(images))
  # Float32 rounding of two separable passes vs torch's one 2-D pass (values in [0, 1]);
  # a float64 source coordinate instead of torch's float32 one would be off by 3e-5.
  np.testing.assert_allclose(ours, np.transpose(theirs, (0, 2, 3, 1)), atol=1e-5)
