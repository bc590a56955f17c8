#!/usr/bin/env bash
# Runs the notebooks in order with papermill: ./run_all.sh [options]
#
#   --profile smoke|quick|paper  smoke: CPU, minutes, synthetic CIFAR (what the tests run)
#                                quick (default): a 2-core CPU in 30-45 min, real CIFAR-10 subset
#                                paper: the paper's CIFAR grid for GPUs (use --shard to split it)
#   --device DEV                 cpu (default), cuda, cuda:1, ...
#   --data-dir DIR               dataset folder (default: $PSI_DATA, else ./data)
#   --out DIR                    results folder (default: results/<profile>); executed notebooks,
#                                figures and run folders go there; re-running reuses finished runs
#   --shard k/n                  only the k-th of n slices of the CIFAR runs (paper profile)
#   --threads N                  CPU threads (default: all cores)
#   --reference DIR              also copy every notebook's figures (PNG) and notebook 05's
#                                table, tests and verdict to DIR
#   --only NN                    run only the notebooks whose name starts with NN (e.g. 04)
set -euo pipefail
cd "$(dirname "$0")"

profile=quick device=cpu data_dir="${PSI_DATA:-}" out="" shard=1/1 threads="" reference="" only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --shard) shard="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --reference) reference="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown option $1 (see ./run_all.sh --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in smoke|quick|paper) ;; *) echo "run_all.sh: --profile must be smoke, quick or paper, not '$profile'" >&2; exit 2 ;; esac
out="${out:-results/$profile}"
mkdir -p "$out/executed"
out="$(cd "$out" && pwd)"
[ -n "$data_dir" ] && data_dir="$(cd "$data_dir" && pwd)"
[ -n "$reference" ] && { mkdir -p "$reference"; reference="$(cd "$reference" && pwd)"; }

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
"$py" -c "import psi, papermill" 2>/dev/null || {
  echo "run_all.sh: '$py' cannot import psi and papermill; set up first (README: pip install -r requirements.txt)" >&2; exit 2; }
# A kernel named psi that runs this very Python, so papermill never stops on NoSuchKernel.
kernel=psi
if ! "$py" -m jupyter kernelspec list 2>/dev/null | grep -q "^ *$kernel "; then
  "$py" -m ipykernel install --sys-prefix --name "$kernel" --display-name "Python (psi)" >/dev/null
fi

params_for() {  # the per-notebook, per-profile parameters
  local nb="$1" fig="$out/figures/${1%.ipynb}"
  local -a p=(-p figures_dir "$fig")
  [ -n "$threads" ] && p+=(-p threads "$threads")
  case "$nb" in
    01_*) [ "$profile" = smoke ] && p+=(-p drift_steps 50 -p fig1_epochs 5) ;;
    02_*) [ "$profile" = smoke ] && p+=(-p steps 60) ;;
    03_*) [ "$profile" = smoke ] && p+=(-p epochs 40 -y "{lr_grid: [0.03, 0.1], rate_T: [10, 20, 40], rate_seeds: 1}") ;;
    04_*) p+=(-p profile "$profile" -p device "$device" -p runs_dir "$out/runs" -p shard "$shard")
          [ -n "$data_dir" ] && p+=(-p data_dir "$data_dir") ;;
    05_*) p=(-p figures_dir "$fig" -p runs_dir "$out/runs")
          [ -n "$reference" ] && p+=(-p reference_dir "$reference") ;;
  esac
  printf '%s\n' "${p[@]}"
}

notebooks=(notebooks/[0-9][0-9]_*.ipynb)
n=${#notebooks[@]} i=0
echo "psi run_all: profile $profile, device $device, results in $out"
for nb in "${notebooks[@]}"; do
  i=$((i + 1))
  name="$(basename "$nb")"
  [ -n "$only" ] && [[ "$name" != "$only"* ]] && continue
  mapfile -t params < <(params_for "$name")
  start=$(date +%s)
  printf '[%d/%d] %-22s ' "$i" "$n" "${name%.ipynb}"
  log="$out/executed/${name%.ipynb}.log"
  if "$py" -m papermill "$nb" "$out/executed/$name" -k "$kernel" --cwd notebooks "${params[@]}" >"$log" 2>&1; then
    echo "ok ($(( $(date +%s) - start )) s)"
  else
    echo "FAILED ($(( $(date +%s) - start )) s)"
    cell=$(grep -o 'Exception encountered at "In \[[0-9]*\]"' "$log" | head -n 1 || true)
    echo "  ${cell:-papermill failed before running a cell}; executed copy kept: $out/executed/$name" >&2
    grep -E '^[A-Za-z_.]*(Error|Exception|Diverged)\b' "$log" | tail -n 3 | sed 's/^/  /' >&2 || true
    echo "  full log: $log; fix it and re-run: finished runs are reused" >&2
    exit 1
  fi
done
if [ -n "$reference" ]; then  # the figures (PNG) of every notebook, beside notebook 05's tables
  for d in "$out"/figures/*/; do
    name="$(basename "$d")"
    [ "$name" = 05_analysis ] && continue
    mkdir -p "$reference/$name"
    cp "$d"*.png "$reference/$name/" 2>/dev/null || true
    cp "$d"*.csv "$reference/$name/" 2>/dev/null || true
  done
  echo "reference results copied to $reference"
fi
echo "done: executed notebooks in $out/executed, figures in $out/figures"
