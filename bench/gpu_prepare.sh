#!/usr/bin/env bash
# Prepares, on a machine with pip and git, what bench/gpu.sh and bench/gpu_profile.sh need
# on a GPU host that cannot reach PyPI, in .gpu/ (git-ignored; carry it to that host):
#   .gpu/wheels/  the pure-Python packages the benchmarks import beyond JAX, Flax, Optax
#                 and PyTorch (ml-collections; for --compare-torch denoising-diffusion-
#                 pytorch 1.10.12, ema-pytorch, pytorch-fid, beartype); gpu_lib.sh
#                 installs them on the GPU host into a temporary folder;
#   .gpu/base/    eo_ddpm_jax/, bench/, configs/ and tests/ of BASE_REF (a commit, tag or
#                 branch), when given: BASELINE_DIR for gpu_profile.sh, to measure a change
#                 against it on the same card in one run. BASE_OVERLAY names files (paths
#                 from the repository root) copied over it from this working tree, to
#                 time one change apart from another (e.g. an old U-Net with new kernels).
#
#   bash bench/gpu_prepare.sh                 # wheels only
#   BASE_REF=7e293bb bash bench/gpu_prepare.sh
#   BASE_REF=bda2d21 BASE_OVERLAY="eo_ddpm_jax/fused_linear_attention.py \
#       bench/common.py bench/profile.py bench/hlo_traffic.py" bash bench/gpu_prepare.sh
# then on the GPU host, from the repository root:
#   BASELINE_DIR=$PWD/.gpu/base bash bench/gpu_profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The torch library at the versions the tests compare against, and what the GPU image
# lacks besides (its list: the device notes' KINDS.md).
REQUIREMENTS=(-r requirements-torch-nodeps.txt ml-collections beartype)

rm -rf .gpu/wheels
mkdir -p .gpu/wheels
# --no-deps: the GPU image has their other needs (torch, einops, accelerate, scipy, ...).
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels "${REQUIREMENTS[@]}"
echo "wheels in .gpu/wheels: $(ls .gpu/wheels | tr '\n' ' ')"

if [[ -n "${BASE_REF:-}" ]]; then
  for path in ${BASE_OVERLAY:-}; do
    if [[ ! -f "$path" ]]; then
      echo "BASE_OVERLAY: $path is not a file of this working tree" >&2
      exit 1
    fi
  done
  rm -rf .gpu/base
  mkdir -p .gpu/base
  git archive "$BASE_REF" eo_ddpm_jax bench configs tests | tar -x -C .gpu/base
  for path in ${BASE_OVERLAY:-}; do
    cp "$path" ".gpu/base/$path"
  done
  echo "baseline $(git rev-parse --short "$BASE_REF")${BASE_OVERLAY:+ with $BASE_OVERLAY from this tree} in .gpu/base"
fi
echo "carry .gpu to the GPU host; bench/gpu_lib.sh installs the wheels there."
