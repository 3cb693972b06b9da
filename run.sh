#!/usr/bin/env bash
# Entry points of eo_ddpm_jax. Each command sets up .venv first when it is missing or stale.
#   ./run.sh setup                 create .venv and install the package with extras
#   ./run.sh demo                  synthetic SEN12MS -> TFDS -> train configs/demo.py -> samples
#   ./run.sh test [pytest args]    the test suite (in parallel; add -n 0 for one process)
#   ./run.sh compare               demo data -> configs/demo_study.py with each schedule -> evaluate
#                                  -> runs/demo_report/report.html (about 20 min on 2 cores)
#   ./run.sh paper --manual_dir=DIR [--data_dir=DIR]   the study: linear, cosine, sigmoid runs
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"
# Stamp: the set-up is redone when any file that defines it changes.
SETUP_FILES=(pyproject.toml constraints.txt requirements-torch-nodeps.txt)

setup_stamp() { cat "${SETUP_FILES[@]}" | sha256sum | cut -d' ' -f1; }

setup() {
  [[ -d "$VENV" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  # CPU torch first, pinned, so nothing later pulls a CUDA build (DESIGN.md).
  "$PY" -m pip install -q -c constraints.txt torch==2.13.0
  "$PY" -m pip install -q -c constraints.txt -e '.[torch,test]'
  "$PY" -m pip install -q --no-deps -r requirements-torch-nodeps.txt
  setup_stamp > "$VENV/.setup-stamp"
}

ensure_setup() {
  if [[ ! -x "$PY" || ! -f "$VENV/.setup-stamp" || "$(cat "$VENV/.setup-stamp")" != "$(setup_stamp)" ]]; then
    echo "[run.sh] setting up $VENV (first run takes a few minutes)"
    setup
  fi
}

demo_data() {
  local data=data/demo
  # 1. Synthetic SEN12MS in the real layout (embedded default data).
  if [[ ! -d "$data/raw/ROIs1868_summer" ]]; then
    "$PY" -m tfds_sen12ms.synthetic --out_dir="$data/raw" --num_scenes=12 --patches_per_scene=40
  fi
  # 2. Through the TFDS builder, as real SEN12MS would go.
  "$PY" -m tfds_sen12ms.build --manual_dir="$data/raw" --data_dir="$data/tfds" --config=summer_rgb
}

demo() {
  local data=data/demo workdir=runs/demo
  demo_data
  # 3. Train the demo config, then sample from its EMA weights.
  "$PY" -m eo_ddpm_jax.main --config=configs/demo.py --workdir="$workdir" \
    --config.data.data_dir="$data/tfds" "$@"
  "$PY" -m eo_ddpm_jax.main --config=configs/demo.py --workdir="$workdir" --mode=sample \
    --config.data.data_dir="$data/tfds"
  echo "[run.sh] demo done: see $workdir (samples/, checkpoints/, metrics.jsonl, TensorBoard events)"
}

compare() {
  # The study's comparison in miniature: the demo config with each schedule, evaluated,
  # then one report over the three runs.
  local data=data/demo runs=()
  demo_data
  for schedule in linear cosine sigmoid; do
    local args=(--config=configs/demo_study.py --workdir="runs/demo_$schedule"
                --config.data.data_dir="$data/tfds" --config.diffusion.schedule="$schedule")
    "$PY" -m eo_ddpm_jax.main "${args[@]}"
    "$PY" -m eo_ddpm_jax.main "${args[@]}" --mode=evaluate
    runs+=("runs/demo_$schedule")
  done
  "$PY" -m eo_ddpm_jax.main --config=configs/demo_study.py --workdir=runs/demo_report --mode=report \
    --config.data.data_dir="$data/tfds" --report_workdirs="$(IFS=,; echo "${runs[*]}")"
  echo "[run.sh] compare done: see runs/demo_report/report.html"
}

paper() {
  local manual_dir="" data_dir=data/tfds
  for arg in "$@"; do
    case "$arg" in
      --manual_dir=*) manual_dir="${arg#*=}" ;;
      --data_dir=*) data_dir="${arg#*=}" ;;
      *) echo "unknown argument: $arg (expected --manual_dir=DIR [--data_dir=DIR])" >&2; exit 2 ;;
    esac
  done
  if [[ -z "$manual_dir" ]]; then
    echo "paper needs --manual_dir=DIR: the folder holding ROIs1868_summer_s2.tar.gz or its unpacked ROIs1868_summer/ tree" >&2
    exit 2
  fi
  "$PY" -m tfds_sen12ms.build --manual_dir="$manual_dir" --data_dir="$data_dir" --config=summer_rgb
  for schedule in linear cosine sigmoid; do
    "$PY" -m eo_ddpm_jax.main --config="configs/$schedule.py" --workdir="runs/$schedule" \
      --config.data.data_dir="$data_dir"
  done
}

cmd="${1:-}"
shift || true
case "$cmd" in
  setup) setup ;;
  demo) ensure_setup; demo "$@" ;;
  # One pytest-xdist worker per core (at most 4), each taking whole test files, as their
  # module fixtures (a built dataset, a trained run) are made once per file: on 2 cores the
  # suite takes 12 min instead of 16, as XLA compiles on one thread.
  test) ensure_setup; "$PY" -m pytest -q -n auto --maxprocesses=4 --dist loadfile "$@" ;;
  compare) ensure_setup; compare ;;
  paper) ensure_setup; paper "$@" ;;
  *) echo "usage: ./run.sh {setup|demo|test|compare|paper --manual_dir=DIR}" >&2; exit 2 ;;
esac
