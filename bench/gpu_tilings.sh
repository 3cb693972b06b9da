#!/usr/bin/env bash
# The fused linear attention's tilings, decided by the train step on an NVIDIA GPU
# (study model: dim 64, (1,2,4), 128x128, T=500; bfloat16; synthetic batches; no torch):
#   1. bench.train_step at batch 256 with the Triton kernels at their default tilings;
#   2. bench.linear_attention_kernels: each kernel's tilings at the study's layer shapes,
#      the best per kernel written to best_tilings.txt beside the tables;
#   3. the batch-256 step again with those best tilings;
#   4. the study's batch-8 step with the best tilings and --check_attention (the U-Net
#      output's distance from the float32 einsum + XLA reference).
# Each step runs under its own timeout; one failure does not stop the rest. About 7
# minutes on an H200. Tables go to $OUT/gpu_tilings.md (else bench/gpu_tilings/).
#
#   bash bench/gpu_prepare.sh                    # first, where pip reaches PyPI (.gpu/)
#   bash bench/gpu_tilings.sh                    # on the GPU machine
#   BENCH_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu_tilings.sh   # tiny, any machine
set -u
source "$(dirname "$0")/gpu_lib.sh"

OUT_DIR="${OUT:-bench/gpu_tilings}"
RESULTS="$(realpath -m "$OUT_DIR/gpu_tilings.md")"
BEST="$(realpath -m "$OUT_DIR/best_tilings.txt")"
CMD_TIMEOUT_S="${BENCH_CMD_TIMEOUT_S:-170}"
# No torch here: JAX may take 90% of the card, preallocated (see gpu_profile.sh).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

if [[ "${BENCH_SMOKE:-0}" == "1" ]]; then
  # Pallas' interpreter at tiny sizes: checks every command end to end on a CPU.
  MODEL=(--dim 16 --dim_mults 1,2 --image_size 32)
  LARGE=4; SMALL=2; IMPL=triton_interpret
  TIMING=(--warmup_steps 1 --steps_per_repeat 2 --repeats 2)
  SWEEP=(--interpret --batch 2 --layers 256x16 --block_elements 1024,2048 --warps 4
         --stages 0 --calls 1 --repeats 1)
else
  MODEL=(--dim 64 --dim_mults 1,2,4 --image_size 128)
  LARGE="${BENCH_LARGE_BATCH:-256}"; SMALL=8; IMPL=triton
  TIMING=(--warmup_steps 2 --steps_per_repeat 10 --repeats 3)
  # Every rows-per-step x warps at Triton's default pipelining: 6 tilings per kernel.
  SWEEP=(--batch "$LARGE" --stages 0 --calls 5)
fi
STEP=(-m bench.train_step "${MODEL[@]}" --timesteps 500 --schedule sigmoid
      --objective pred_noise "${TIMING[@]}" --precision bfloat16
      --linear_attention_impl "$IMPL" --results "$RESULTS")

mkdir -p "$OUT_DIR"
rm -f "$BEST"
write_header "GPU tiling run" "BENCH_SMOKE=${BENCH_SMOKE:-0}"

run_python "train b$LARGE, default tilings" . "$CMD_TIMEOUT_S" "${STEP[@]}" \
    --batch "$LARGE" --note "Fused kernels at their default tilings."
run_python "kernel tilings" . "$CMD_TIMEOUT_S" -m bench.linear_attention_kernels \
    "${SWEEP[@]}" --best_to "$BEST" --results "$RESULTS"
if [[ -s "$BEST" ]]; then
  TILINGS="$(cat "$BEST")"
  run_python "train b$LARGE, best tilings" . "$CMD_TIMEOUT_S" "${STEP[@]}" \
      --batch "$LARGE" --linear_attention_tilings "$TILINGS" \
      --note "Fused kernels at the sweep's best tilings: \`$TILINGS\`."
  run_python "train b$SMALL, best tilings, output check" . "$CMD_TIMEOUT_S" "${STEP[@]}" \
      --batch "$SMALL" --linear_attention_tilings "$TILINGS" --check_attention \
      --note "Fused kernels at the sweep's best tilings: \`$TILINGS\`."
else
  FAILED+=("best tilings (the sweep wrote none)")
fi
finish
