#!/usr/bin/env bash
# Where an NVIDIA GPU's time goes in the study model's train step (dim 64, (1,2,4),
# 128x128, T=500), and its model-FLOPs utilisation at batch 256 in bfloat16.
#
# Needs JAX (CUDA), Flax, Optax and ml_collections; synthetic batches, no torch. Runs,
# each under its own timeout, all within about 10 minutes on an H100:
#   1. bench.train_step, bfloat16, batch 256: images/s and MFU, with the linear
#      attention in XLA and in the fused Triton kernels (model.linear_attention_impl=
#      triton, what the default auto picks on a GPU);
#   2. the Triton kernels' numbers on this GPU: the study's batch-8 step with them, and
#      the U-Net output's distance from the float32 reference (--check_attention);
#   3. the batch-256 step from the checkout in $BASELINE_DIR, when set (a copy of an
#      older commit's eo_ddpm_jax/, bench/ and configs/; its own defaults), to measure
#      a change on the same card;
#   4. the study's batch (8) in bfloat16: HEAD, the baseline when set, and HEAD with
#      XLA's command buffers (CUDA graphs) asked for all kernel kinds;
#   5. bench.profile of the batch-256 step with $PROFILE_LINEAR_ATTENTION (default
#      triton; xla profiles the XLA version): time per XLA op kind and per GPU kernel,
#      XLA's kernels against the bytes they move (TB/s, time over the bandwidth floor,
#      op name), with the trace and the optimised HLO kept; then, with $BASELINE_DIR,
#      the baseline's batch-256 step profiled alike (that table needs its checkout to
#      have bench/profile.py, bench/hlo_traffic.py and the bench/common.py they use:
#      gpu_prepare.sh's BASE_OVERLAY);
#   6. bench.profile of the study's own step (batch 8, float32).
# BENCH_SKIP="KEY ..." leaves runs out, to fit a short lease: xla (1's XLA step), check
# (2), small (4's batch-8 steps), graphs (4's command buffers), baseline_profile (5's
# baseline), f32 (6).
# Tables go to $OUT/gpu_profile.md (else bench/gpu_profile/gpu_profile.md); traces and
# HLO are packed into gpu_profile_traces.tgz beside it.
#
#   BASE_REF=<commit> bash bench/gpu_prepare.sh     # first, where pip reaches PyPI:
#                                                   # wheels and a baseline in .gpu/
#   bash bench/gpu_profile.sh                       # on the GPU machine
#   BASELINE_DIR=/path/to/old bash bench/gpu_profile.sh
#   BENCH_LARGE_BATCH=128 bash bench/gpu_profile.sh  # if 256 does not fit the card
#   BENCH_SKIP="xla check f32 baseline_profile" BASELINE_DIR=$PWD/.gpu/base \
#       bash bench/gpu_profile.sh                   # ~7.5 min on an H200
#   BENCH_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu_profile.sh   # tiny, any machine
set -u
source "$(dirname "$0")/gpu_lib.sh"

OUT_DIR="${OUT:-bench/gpu_profile}"
RESULTS="$(realpath -m "$OUT_DIR/gpu_profile.md")"
WORK="$(mktemp -d)"
CMD_TIMEOUT_S="${BENCH_CMD_TIMEOUT_S:-150}"
# No torch here, so JAX may take 90% of the card, preallocated: with preallocation off
# (bench/common.py's default, which leaves room for torch) the batch-256 step's one
# 47.8 GiB buffer did not fit on an 80 GB H100 even at 90% (2026-11-27), a pool
# fragmented by growth (JAX's GPU memory docs); on a 141 GB H200 it ran (49.0 GiB peak).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

# The fused linear attention: Triton kernels on the GPU; in the smoke run, the same
# kernels interpreted (a CPU cannot run Triton).
TRITON=triton
if [[ "${BENCH_SMOKE:-0}" == "1" ]]; then
  MODEL=(--dim 16 --dim_mults 1,2 --image_size 32)
  LARGE=4; SMALL=2; TRITON=triton_interpret
  TIMING=(--warmup_steps 1 --steps_per_repeat 2 --repeats 2)
  SMALL_TIMING=("${TIMING[@]}")
else
  MODEL=(--dim 64 --dim_mults 1,2,4 --image_size 128)
  LARGE="${BENCH_LARGE_BATCH:-256}"; SMALL=8
  TIMING=(--warmup_steps 2 --steps_per_repeat 10 --repeats 3)
  # A batch-8 step takes ~17 ms and varies by a few ms: more of them, for an A/B.
  SMALL_TIMING=(--warmup_steps 5 --steps_per_repeat 20 --repeats 10)
fi
COMMON=("${MODEL[@]}" --timesteps 500 --schedule sigmoid --objective pred_noise)

mkdir -p "$OUT_DIR"
write_header "GPU profile run" \
    "BASELINE_DIR=${BASELINE_DIR:-unset}, BENCH_SMOKE=${BENCH_SMOKE:-0}"

run() {
  # run NAME DIR ARGS...: one python command in DIR under the per-command timeout.
  local name="$1" dir="$2"; shift 2
  run_python "$name" "$dir" "$CMD_TIMEOUT_S" "$@"
}

wanted() {
  # wanted KEY: false when BENCH_SKIP names KEY (noted among the skipped).
  if [[ " ${BENCH_SKIP:-} " == *" $1 "* ]]; then
    FAILED+=("$1 (skipped: BENCH_SKIP)")
    return 1
  fi
}

wanted xla && run "train bfloat16 b$LARGE, xla linear attention" . -m bench.train_step \
    "${COMMON[@]}" "${TIMING[@]}" --precision bfloat16 --batch "$LARGE" \
    --linear_attention_impl xla --results "$RESULTS"
run "train bfloat16 b$LARGE, $TRITON linear attention" . -m bench.train_step \
    "${COMMON[@]}" "${TIMING[@]}" --precision bfloat16 --batch "$LARGE" \
    --linear_attention_impl "$TRITON" --results "$RESULTS"
wanted check && run "train bfloat16 b$SMALL, $TRITON linear attention, output check" . \
    -m bench.train_step "${COMMON[@]}" "${TIMING[@]}" --precision bfloat16 \
    --batch "$SMALL" --linear_attention_impl "$TRITON" --check_attention \
    --results "$RESULTS"
if [[ -n "${BASELINE_DIR:-}" ]]; then
  run "train bfloat16 b$LARGE, baseline" "$BASELINE_DIR" -m bench.train_step \
      "${COMMON[@]}" "${TIMING[@]}" --precision bfloat16 --batch "$LARGE" \
      --results "$RESULTS" --note "Baseline checkout: $BASELINE_DIR."
fi
# The study's batch, where the step is bound by its ~1,400-1,800 kernel launches more
# than by bytes or FLOPs: HEAD and the baseline, then HEAD with XLA's command buffers
# (CUDA graphs) asked for every kernel kind, in case the defaults leave some out.
if wanted small; then
  run "train bfloat16 b$SMALL" . -m bench.train_step "${COMMON[@]}" "${SMALL_TIMING[@]}" \
      --precision bfloat16 --batch "$SMALL" --results "$RESULTS"
  if [[ -n "${BASELINE_DIR:-}" ]]; then
    run "train bfloat16 b$SMALL, baseline" "$BASELINE_DIR" -m bench.train_step \
        "${COMMON[@]}" "${SMALL_TIMING[@]}" --precision bfloat16 --batch "$SMALL" \
        --results "$RESULTS" --note "Baseline checkout: $BASELINE_DIR."
  fi
fi
if wanted graphs; then
  SAVED_XLA_FLAGS="${XLA_FLAGS:-}"
  export XLA_FLAGS="$SAVED_XLA_FLAGS --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1"
  run "train bfloat16 b$SMALL, command buffers for all kernels" . -m bench.train_step \
      "${COMMON[@]}" "${SMALL_TIMING[@]}" --precision bfloat16 --batch "$SMALL" \
      --results "$RESULTS"
  export XLA_FLAGS="$SAVED_XLA_FLAGS"
fi
PROFILE_LINEAR_ATTENTION="${PROFILE_LINEAR_ATTENTION:-$TRITON}"
run "profile bfloat16 b$LARGE, $PROFILE_LINEAR_ATTENTION linear attention" . \
    -m bench.profile "${COMMON[@]}" --precision bfloat16 \
    --linear_attention_impl "$PROFILE_LINEAR_ATTENTION" --batch "$LARGE" --calls 3 \
    --top 30 --trace_dir "$WORK/trace_b$LARGE" --dump_hlo "$WORK/hlo_b$LARGE" --results "$RESULTS"
if [[ -n "${BASELINE_DIR:-}" ]] && wanted baseline_profile; then
  run "profile bfloat16 b$LARGE, baseline" "$BASELINE_DIR" -m bench.profile \
      "${COMMON[@]}" --precision bfloat16 --batch "$LARGE" --calls 3 --top 30 \
      --trace_dir "$WORK/trace_b${LARGE}_baseline" \
      --dump_hlo "$WORK/hlo_b${LARGE}_baseline" --results "$RESULTS" \
      --note "Baseline checkout: $BASELINE_DIR."
fi
wanted f32 && run "profile float32 b$SMALL" . -m bench.profile "${COMMON[@]}" \
    --precision float32 --batch "$SMALL" --calls 5 --top 20 \
    --trace_dir "$WORK/trace_b$SMALL" --results "$RESULTS"

# Only the optimised train-step modules of the HLO dump: the rest is large and unused.
find "$WORK" -path '*hlo_*' -type f ! -name '*train_step*after_optimizations.txt' -delete
tar -czf "$OUT_DIR/gpu_profile_traces.tgz" -C "$WORK" .
rm -rf "$WORK"
finish
