"""Writes inception_reference.npz: pytorch-fid's FID Inception on random weights.

The reference for tests/test_inception.py, made with the real pytorch-fid network
(`InceptionV3([3])` with torchvision's Inception-v3 and the FIDInceptionA/C/E_1/E_2
patches), which needs a torchvision that loads beside torch. That is too heavy for CI, so
this script is run once by hand, in a separate environment:

  python -m venv /tmp/tvenv
  /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
  /tmp/tvenv/bin/pip install --no-deps pytorch-fid==0.3.0
  /tmp/tvenv/bin/python tests/data/make_inception_reference.py

Weights: conv kernels are drawn from NumPy with a seed per tensor (`random_conv_weight`,
which the test calls too, so the 87 MB of kernels are not stored); BatchNorm scales and
biases are random (scales in BN_SCALE_RANGE), and the running statistics are calibrated on a separate random batch
(one forward pass in training mode, variances floored at their layer mean) so that activations stay O(1) through all layers.
Stored: those BatchNorm tensors, the conv names and shapes, a batch of 2 input images in
[0, 1] (small and non-square, so the bilinear resize to 299 is exercised) and the 2048-d
features pytorch-fid returns for them.
"""

import json
import os
import zlib

import numpy as np

SEED = 20151205
INPUT_SHAPE = (2, 3, 75, 90)  # NCHW, as pytorch-fid takes it.
CALIBRATION_SHAPE = (4, 3, 75, 90)  # Like the input, so the statistics fit it.
# BatchNorm scales below 1, with the variance floor below, keep the random network well
# conditioned: calibrated on a small batch without them it amplified relative input
# changes about 200-fold, so float32 rounding alone separated two correct
# implementations by more than 1e-4 (now about 8-fold, and 1e-5 apart).
BN_SCALE_RANGE = (0.3, 0.8)
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'inception_reference.npz')


def random_conv_weight(key: str, shape) -> np.ndarray:
  """He-normal float32 [O, I, kh, kw] conv weight, seeded by SEED and the key's crc32."""
  rng = np.random.default_rng([SEED, zlib.crc32(key.encode())])
  fan_in = int(np.prod(shape[1:]))
  return (rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2 / fan_in)))


def main():
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception as fid_inception  # pylint: disable=g-import-not-at-top

  template = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                             init_weights=False).state_dict()
  rng = np.random.default_rng(SEED)
  state_dict, conv_shapes = {}, {}
  for key, value in template.items():
    if key.endswith('conv.weight'):
      conv_shapes[key] = list(value.shape)
      state_dict[key] = torch.from_numpy(random_conv_weight(key, tuple(value.shape)))
    elif key.endswith('bn.weight'):
      state_dict[key] = torch.from_numpy(rng.uniform(*BN_SCALE_RANGE, value.shape).astype(np.float32))
    elif key.endswith('bn.bias'):
      state_dict[key] = torch.from_numpy(rng.normal(0, 0.1, value.shape).astype(np.float32))
    else:  # Running statistics (calibrated below), num_batches_tracked, fc.
      state_dict[key] = value.clone()
  # pytorch-fid downloads its weights at this call; hand it ours instead.
  fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
  model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])

  batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for bn in batch_norms:
    bn.reset_running_stats()
    bn.momentum = None  # Cumulative average: after one pass, that batch's statistics.
  model.train()
  with torch.no_grad():
    model(torch.from_numpy(rng.uniform(0, 1, CALIBRATION_SHAPE).astype(np.float32)))
    for bn in batch_norms:
      # Nearly constant channels would get huge gains 1/sqrt(var) from so small a batch.
      bn.running_var.clamp_(min=bn.running_var.mean().item())
  model.eval()

  images = rng.uniform(0, 1, INPUT_SHAPE).astype(np.float32)
  with torch.no_grad():
    features = model(torch.from_numpy(images))[0].reshape(INPUT_SHAPE[0], -1).numpy()

  # Map the module names of pytorch-fid's blocks back to the state_dict's names.
  names = {id(m): n for n, m in model.named_modules()}
  block_to_key = {}
  inception_names = [n for n in template if n.endswith('bn.running_mean')]
  bn_in_model = [names[id(bn)] for bn in batch_norms]
  assert len(bn_in_model) == len(inception_names)
  # Both list the layers in definition order (the FID blocks keep their slots).
  for bn, model_name, key in zip(batch_norms, bn_in_model, inception_names):
    assert tuple(bn.running_mean.shape) == tuple(template[key].shape), (model_name, key)
    block_to_key[model_name] = key[:-len('.running_mean')]
  stored = {}
  for bn in batch_norms:
    prefix = block_to_key[names[id(bn)]]
    stored[prefix + '.weight'] = bn.weight.detach().numpy()
    stored[prefix + '.bias'] = bn.bias.detach().numpy()
    stored[prefix + '.running_mean'] = bn.running_mean.numpy()
    stored[prefix + '.running_var'] = bn.running_var.numpy()
  np.savez_compressed(OUTPUT, images_nhwc=np.transpose(images, (0, 2, 3, 1)),
                      features=features, conv_shapes=np.array(json.dumps(conv_shapes)),
                      torch_version=np.array(torch.__version__),
                      torchvision_version=np.array(torchvision.__version__),
                      **{'bn/' + k: v for k, v in stored.items()})
  print(f'wrote {OUTPUT}: features {features.shape}, |f| mean {np.abs(features).mean():.4f}')


if __name__ == '__main__':
  main()
