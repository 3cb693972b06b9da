# Shared by bench/gpu.sh and bench/gpu_profile.sh (sourced, not run): the set-up, a run's
# header in the results file, running one python command under a timeout, the summary.
# The sourcing script sets RESULTS (the markdown file) before calling these.

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
FAILED=()

# Packages carried as wheels (bench/gpu_prepare.sh) to a host that cannot reach PyPI go
# into a temporary folder on PYTHONPATH, made absolute as runs cd into BASELINE_DIR.
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  CARRIED_SITE="${TMPDIR:-/tmp}/eo_ddpm_jax_carried_site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade \
      --target "$CARRIED_SITE" .gpu/wheels/*.whl || exit 1
  export PYTHONPATH="$CARRIED_SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "== carried wheels installed in $CARRIED_SITE: $(ls .gpu/wheels | tr '\n' ' ')"
fi

# write_header TITLE LINE...: opens a run's section in $RESULTS: the title and the time,
# the GPU, then each LINE as a bullet.
write_header() {
  local title="$1"; shift
  local gpu
  gpu="$(nvidia-smi -L 2>/dev/null | head -n 1)"
  mkdir -p "$(dirname "$RESULTS")"
  {
    echo "# $title $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- nvidia-smi: ${gpu:-none}"
    printf -- '- %s\n' "$@"
  } >>"$RESULTS"
}

# run_python NAME DIR LIMIT_S ARGS...: "$PYTHON" ARGS in DIR, killed after LIMIT_S
# seconds. A failure does not stop the script: it is added to FAILED and noted in $RESULTS.
run_python() {
  local name="$1" dir="$2" limit="$3"; shift 3
  echo "== $name (timeout ${limit}s, ${SECONDS}s elapsed)"
  local start=$SECONDS
  (cd "$dir" && timeout --kill-after=10 "$limit" "$PYTHON" "$@")
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
  if ((rc != 0)); then
    FAILED+=("$name (exit $rc)")
    echo "- $name failed with exit $rc$( ((rc == 124)) && echo ' (timeout)')" >>"$RESULTS"
  fi
}

# finish: echoes $RESULTS and what failed or was skipped.
finish() {
  echo
  echo "==================== $RESULTS ===================="
  cat "$RESULTS"
  echo
  echo "Total ${SECONDS}s; failed or skipped: ${FAILED[*]:-none}"
}
