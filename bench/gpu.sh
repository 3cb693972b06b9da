#!/usr/bin/env bash
# Speed benchmarks on one NVIDIA GPU: eo_ddpm_jax beside denoising-diffusion-pytorch 1.10.12.
#
# Needs only JAX (CUDA), Flax, Optax, PyTorch (CUDA) and ml_collections, denoising-
# diffusion-pytorch 1.10.12, ema-pytorch, pytorch-fid and beartype (on PYTHONPATH, or as
# wheels in .gpu/wheels from bench/gpu_prepare.sh, which gpu_lib.sh installs); data are
# synthetic batches in device memory. Runs, most important first, each under its own
# timeout and all under one deadline so the whole script ends within BENCH_BUDGET_S:
#   1. train step, the study's config (dim 64, (1,2,4), 128x128, T=500, batch 8),
#      float32 and bfloat16, with the torch comparison;
#   2. sampling 25 images (DDPM 500 steps, DDIM 50), bfloat16 and float32, with torch;
#   3. train step at batch 64 (JAX and torch) and 256 (JAX) in bfloat16.
# One failure does not stop the rest. Tables go to $OUT/gpu_results.md when OUT is set,
# else bench/gpu_results.md, and are echoed at the end. BENCH_ONLY="key ..." runs only
# those benchmarks (keys: train_f32_b8 train_bf16_b8 sample_bf16 sample_f32
# train_bf16_b64 train_bf16_b256 train_bf16_b256_xla), in this order.
#
#   bash bench/gpu_prepare.sh                  # first, where pip reaches PyPI (.gpu/)
#   bash bench/gpu.sh                          # on the GPU machine
#   BENCH_ONLY="train_bf16_b256" bash bench/gpu.sh
#   BENCH_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu.sh   # tiny sizes, any machine
set -u
source "$(dirname "$0")/gpu_lib.sh"

RESULTS="${OUT:+$OUT/gpu_results.md}"
RESULTS="${RESULTS:-bench/gpu_results.md}"
BUDGET_S="${BENCH_BUDGET_S:-450}"   # Whole script; the lease allows 8 minutes.
CMD_TIMEOUT_S="${BENCH_CMD_TIMEOUT_S:-150}"
MIN_START_S=30  # Don't start a benchmark with less budget than this left.

if [[ "${BENCH_SMOKE:-0}" == "1" ]]; then
  # Tiny sizes to check every command end to end on a CPU.
  MODEL=(--dim 16 --dim_mults 1,2 --image_size 32)
  BATCH=2; LARGE_BATCHES=(4 8); NUM_IMAGES=4
  TRAIN_TIMING=(--warmup_steps 1 --steps_per_repeat 2 --repeats 2)
  SAMPLE_TIMING=(--ddpm_num_steps 3 --torch_ddpm_num_steps 2 --ddim_num_steps 2
                 --warmup_runs 0 --repeats 1)
  BUDGET_S="${BENCH_BUDGET_S:-1500}"; CMD_TIMEOUT_S="${BENCH_CMD_TIMEOUT_S:-400}"
else
  MODEL=(--dim 64 --dim_mults 1,2,4 --image_size 128)
  BATCH=8; LARGE_BATCHES=(64 256); NUM_IMAGES=25
  # Ten steps per block hold exactly one EMA update in both frameworks.
  TRAIN_TIMING=(--warmup_steps 3 --steps_per_repeat 10 --repeats 5)
  # JAX: the full 500-step DDPM loop, once warm, twice timed; torch (eager, slower):
  # 100 of its 500 steps, extrapolated (the table says so).
  SAMPLE_TIMING=(--warmup_runs 1 --repeats 2 --torch_ddpm_num_steps 100)
fi
COMMON=("${MODEL[@]}" --timesteps 500 --schedule sigmoid --objective pred_noise
        --results "$RESULTS")

write_header "GPU benchmark run" \
    "PYTHON=$PYTHON ($("$PYTHON" --version 2>&1)), BENCH_SMOKE=${BENCH_SMOKE:-0}"

run() {
  # run KEY NAME ARGS...: one benchmark, if BENCH_ONLY names it, under the per-command
  # timeout and the whole script's deadline.
  local key="$1" name="$2"; shift 2
  if [[ -n "${BENCH_ONLY:-}" && " $BENCH_ONLY " != *" $key "* ]]; then
    return
  fi
  local left=$((BUDGET_S - SECONDS))
  if ((left < MIN_START_S)); then
    echo "== SKIP $name: ${left}s of the ${BUDGET_S}s budget left" | tee -a "$RESULTS"
    FAILED+=("$name (skipped)")
    return
  fi
  run_python "$name" . $((left < CMD_TIMEOUT_S ? left : CMD_TIMEOUT_S)) "$@"
}

run train_f32_b8 "train float32 b$BATCH" -m bench.train_step "${COMMON[@]}" \
    "${TRAIN_TIMING[@]}" --precision float32 --batch "$BATCH" --compare-torch
# bfloat16 uses the fused cuDNN attention (model.attention_impl=auto); --check_attention
# reports its distance from the einsum reference.
run train_bf16_b8 "train bfloat16 b$BATCH" -m bench.train_step "${COMMON[@]}" \
    "${TRAIN_TIMING[@]}" --precision bfloat16 --batch "$BATCH" --compare-torch \
    --check_attention
run sample_bf16 "sample bfloat16" -m bench.sample "${COMMON[@]}" "${SAMPLE_TIMING[@]}" \
    --precision bfloat16 --num_images "$NUM_IMAGES" --compare-torch
run sample_f32 "sample float32" -m bench.sample "${COMMON[@]}" "${SAMPLE_TIMING[@]}" \
    --precision float32 --num_images "$NUM_IMAGES" --compare-torch
run train_bf16_b64 "train bfloat16 b${LARGE_BATCHES[0]}" -m bench.train_step \
    "${COMMON[@]}" "${TRAIN_TIMING[@]}" --precision bfloat16 \
    --batch "${LARGE_BATCHES[0]}" --compare-torch
# JAX alone: it may take 90% of the GPU's memory, preallocated (common.py's default,
# allocation on demand, leaves room for torch in the same process; on an 80 GB H100 it
# could not place this step's one 47.8 GiB buffer even at 90%: a pool fragmented by
# growth, as JAX's GPU memory docs warn).
# The default linear attention, auto: the fused Triton kernels on a GPU (in the smoke run
# on a CPU, the same kernels interpreted); then XLA's version, to compare.
LINEAR=auto; [[ "${BENCH_SMOKE:-0}" == "1" ]] && LINEAR=triton_interpret
XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
run train_bf16_b256 "train bfloat16 b${LARGE_BATCHES[1]}" -m bench.train_step \
    "${COMMON[@]}" "${TRAIN_TIMING[@]}" --precision bfloat16 --batch "${LARGE_BATCHES[1]}" \
    --linear_attention_impl "$LINEAR"
XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
run train_bf16_b256_xla "train bfloat16 b${LARGE_BATCHES[1]}, XLA linear attention" \
    -m bench.train_step "${COMMON[@]}" "${TRAIN_TIMING[@]}" --precision bfloat16 \
    --batch "${LARGE_BATCHES[1]}" --linear_attention_impl xla
finish
