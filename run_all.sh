#!/usr/bin/env bash
# Runs the notebooks in order with papermill: ./run_all.sh [options]
#
#   --profile smoke|quick|paper|imagenet
#                                smoke: CPU, minutes, synthetic CIFAR (what the tests run)
#                                quick (default): a 2-core CPU in 30-45 min, real CIFAR-10 subset
#                                paper: the paper's CIFAR grid for GPUs (use --gpus, or --shard)
#                                imagenet: Table 1's ImageNet rows (ResNet-18/34/50, 100 epochs,
#                                3 seeds) for GPUs; --data-dir holds ILSVRC-2012 (train/, val/)
#   --device DEV                 cpu (default; cuda with --gpus), cuda, cuda:1, ...
#   --data-dir DIR               dataset folder (default: $PSI_DATA, else ./data)
#   --out DIR                    results folder (default: results/<profile>); executed notebooks,
#                                figures and run folders go there; re-running reuses finished runs
#   --shard k/n                  only the k-th of n slices of the training runs: with n > 1 only
#                                notebook 04 runs (executed copy, log and figures named
#                                04_cifar.shard-k-of-n); shards may share --out and run at once;
#                                when all are done, a plain run with the same --out finishes the rest
#   --threads N                  CPU threads (default: all cores; per worker with --gpus/--workers)
#   --reference DIR              also copy every notebook's figures (PNG) and notebook 05's
#                                table, tests and verdict to DIR
#   --only NN                    run only the notebooks whose name starts with NN (e.g. 04)
#   --cpu-isa avx2|native        the CPU kernels torch trains with. avx2 (default): smoke and quick run
#                                under torch's AVX2 kernels on x86-64 (ATEN_CPU_CAPABILITY=avx2
#                                ONEDNN_MAX_CPU_ISA=AVX2, exported before anything imports torch), so
#                                that they give reference/quick's numbers to the bit on any x86-64 CPU;
#                                native: the CPU's best (AVX-512 where it has it: faster, other last
#                                bits). paper and imagenet are not pinned (native unsets the two too)
#
# The training runs on many GPUs or CPU workers (python -m psi.grid run, before the notebooks;
# notebook 04 then reads the finished runs back):
#   --gpus 0,1,...               one worker per GPU (x --runs-per-gpu), each seeing only its GPU
#   --runs-per-gpu N             workers per GPU (default 1; start NVIDIA MPS for N > 1)
#   --procs-per-run N            each run data-parallel (torchrun) on N GPUs of --gpus
#   --workers N                  N worker processes on the CPU (without --gpus)
#   --dry-run                    print the grid, where each run goes and the device-hours it
#                                takes; train nothing, run no notebook
# How the runs train (notebook 04's parameters and psi.grid's options; default: the device's best):
#   --amp auto|none|bf16|fp16    mixed precision (auto: bf16 on CUDA, none on the CPU)
#   --no-compile                 no torch.compile (default: on for CUDA)
#   --no-channels-last           NCHW tensors (default: channels-last on CUDA)
#   --deterministic              torch's deterministic algorithms (bitwise resume on CUDA, slower)
set -euo pipefail
cd "$(dirname "$0")"

profile=quick device="" data_dir="${PSI_DATA:-}" out="" shard=1/1 threads="" reference="" only=""
cpu_isa=avx2 gpus="" runs_per_gpu="" procs_per_run="" workers="" dry_run="" amp="" no_compile="" no_channels_last="" deterministic=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --runs-per-gpu) runs_per_gpu="$2"; shift 2 ;;
    --procs-per-run) procs_per_run="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --amp) amp="$2"; shift 2 ;;
    --no-compile) no_compile=1; shift ;;
    --no-channels-last) no_channels_last=1; shift ;;
    --deterministic) deterministic=1; shift ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --shard) shard="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --reference) reference="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --cpu-isa) cpu_isa="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown option $1 (see ./run_all.sh --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in smoke|quick|paper|imagenet) ;; *) echo "run_all.sh: --profile must be smoke, quick, paper or imagenet, not '$profile'" >&2; exit 2 ;; esac
case "$cpu_isa" in avx2|native) ;; *) echo "run_all.sh: --cpu-isa must be avx2 or native, not '$cpu_isa'" >&2; exit 2 ;; esac
# The CPU kernels (psi.engine.kernels; docs/cpu-study.md): torch reads both variables when it first runs a
# kernel, so they are set here, before any process imports torch; psi.grid, papermill and every notebook's
# kernel inherit them.
if [ "$cpu_isa" = native ]; then
  unset ATEN_CPU_CAPABILITY ONEDNN_MAX_CPU_ISA
elif [[ "$profile" == smoke || "$profile" == quick ]] && [[ "$(uname -m)" == x86_64 || "$(uname -m)" == amd64 ]]; then
  export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
fi
if [[ ! "$shard" =~ ^([0-9]+)/([0-9]+)$ ]] || [ "${BASH_REMATCH[1]}" -lt 1 ] || [ "${BASH_REMATCH[1]}" -gt "${BASH_REMATCH[2]}" ]; then
  echo "run_all.sh: --shard must be k/n with 1 <= k <= n, not '$shard'" >&2; exit 2
fi
k_shard=${BASH_REMATCH[1]} n_shard=${BASH_REMATCH[2]} tag=""
if [ "$n_shard" -gt 1 ]; then  # a slice of notebook 04's runs; the other notebooks once, after all shards
  [ -n "$only" ] && [[ "04_cifar" != "$only"* ]] && { echo "run_all.sh: with --shard $shard only notebook 04 runs, not --only $only" >&2; exit 2; }
  [ -n "$reference" ] && { echo "run_all.sh: --reference goes with the final run without --shard" >&2; exit 2; }
  only=04 tag=".shard-$k_shard-of-$n_shard"
fi
device="${device:-$([ -n "$gpus" ] && echo cuda || echo cpu)}"
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
register_kernel() {
  if ! "$py" -m jupyter kernelspec list 2>/dev/null | grep -q "^ *$kernel "; then
    "$py" -m ipykernel install --sys-prefix --name "$kernel" --display-name "Python (psi)" >/dev/null
  fi
}
if command -v flock >/dev/null; then  # shards started together register it once
  ( flock 9; register_kernel ) 9>"$out/.kernel.lock"
else
  register_kernel
fi

# How the runs train: the same settings for psi.grid and notebook 04, so that their run folders match.
nb_train=() grid_train=()
[ -n "$amp" ] && { nb_train+=(-p amp "$amp"); grid_train+=(--amp "$amp"); }
[ -n "$no_compile" ] && { nb_train+=(-p compile False); grid_train+=(--no-compile); }
[ -n "$no_channels_last" ] && { nb_train+=(-p channels_last False); grid_train+=(--no-channels-last); }
[ -n "$deterministic" ] && { nb_train+=(-p deterministic True); grid_train+=(--deterministic); }

params_for() {  # the per-notebook, per-profile parameters (notebook 04: for dataset $2, its name suffix $3)
  local nb="$1" fig="$out/figures/${1%.ipynb}$3$tag"
  local -a p=(-p figures_dir "$fig")
  [ -n "$threads" ] && p+=(-p threads "$threads")
  case "$nb" in
    01_*) [ "$profile" = smoke ] && p+=(-p drift_steps 50 -p fig1_epochs 5) ;;
    02_*) [ "$profile" = smoke ] && p+=(-p steps 60) ;;
    03_*) [ "$profile" = smoke ] && p+=(-p epochs 40 -y "{lr_grid: [0.03, 0.1], rate_T: [10, 20, 40], rate_seeds: 1}") ;;
    04_*) p+=(-p profile "$profile" -p dataset "$2" -p device "$device" -p runs_dir "$out/runs" -p shard "$shard" "${nb_train[@]}")
          [ -n "$data_dir" ] && p+=(-p data_dir "$data_dir") ;;
    05_*) p=(-p figures_dir "$fig" -p runs_dir "$out/runs")
          [ -n "$reference" ] && p+=(-p reference_dir "$reference") ;;
  esac
  printf '%s\n' "${p[@]}"
}

notebooks=(notebooks/[0-9][0-9]_*.ipynb)
# notebook 04 runs once per dataset of the profile (paper: CIFAR-10 and CIFAR-100, Tables 1 and 2)
read -r -a datasets < <("$py" -c "from psi.study.profiles import PROFILE_DATASETS; print(*PROFILE_DATASETS['$profile'])")
n=${#notebooks[@]} i=0
kernels_now=$("$py" -c "import os, torch; print(torch.backends.cpu.get_cpu_capability(), 'kernels (oneDNN ISA', os.environ.get('ONEDNN_MAX_CPU_ISA') or 'native', end=')')")
echo "psi run_all: profile $profile, device $device, results in $out${tag:+, shard $shard}; CPU: $kernels_now"
if [ -n "$gpus$runs_per_gpu$procs_per_run$workers$dry_run" ] && { [ -z "$only" ] || [[ "04_cifar" == "$only"* ]]; }; then
  for d in "${datasets[@]}"; do
    grid=("$py" -m psi.grid run --profile "$profile" --set "dataset=$d" --out "$out" --device "$device" --shard "$shard"
          --cpu-isa "$cpu_isa" "${grid_train[@]}")
    [ -n "$gpus" ] && grid+=(--gpus "$gpus")
    [ -n "$runs_per_gpu" ] && grid+=(--runs-per-gpu "$runs_per_gpu")
    [ -n "$procs_per_run" ] && grid+=(--procs-per-run "$procs_per_run")
    [ -n "$workers" ] && grid+=(--workers "$workers")
    [ -n "$threads" ] && grid+=(--threads "$threads")
    [ -n "$data_dir" ] && grid+=(--data-dir "$data_dir")
    if [ -n "$dry_run" ]; then "${grid[@]}" --dry-run || exit $?; continue; fi
    echo "training runs: ${grid[*]}"
    "${grid[@]}" || { echo "run_all.sh: the training runs failed (python -m psi.grid, above); fix and re-run: finished runs are reused" >&2; exit 1; }
  done
  [ -n "$dry_run" ] && exit 0
fi
for nb in "${notebooks[@]}"; do
  i=$((i + 1))
  name="$(basename "$nb")"
  [ -n "$only" ] && [[ "$name" != "$only"* ]] && continue
  runs_of=("${datasets[0]}")
  [[ "$name" == 04_* ]] && runs_of=("${datasets[@]}")
  for d in "${runs_of[@]}"; do
  suffix=""
  [[ "$name" == 04_* ]] && [ "${#datasets[@]}" -gt 1 ] && suffix=".$d"
  mapfile -t params < <(params_for "$name" "$d" "$suffix")
  start=$(date +%s)
  printf '[%d/%d] %-22s ' "$i" "$n" "${name%.ipynb}$suffix"
  executed="$out/executed/${name%.ipynb}$suffix$tag.ipynb"
  log="${executed%.ipynb}.log"
  if "$py" -m papermill "$nb" "$executed" -k "$kernel" --cwd notebooks "${params[@]}" >"$log" 2>&1; then
    echo "ok ($(( $(date +%s) - start )) s)"
  else
    echo "FAILED ($(( $(date +%s) - start )) s)"
    cell=$(grep -o 'Exception encountered at "In \[[0-9]*\]"' "$log" | head -n 1 || true)
    echo "  ${cell:-papermill failed before running a cell}; executed copy kept: $executed" >&2
    grep -E '^[A-Za-z_.]*(Error|Exception|Diverged)\b' "$log" | tail -n 3 | sed 's/^/  /' >&2 || true
    echo "  full log: $log; fix it and re-run: finished runs are reused" >&2
    exit 1
  fi
  done
done
if [ -n "$reference" ]; then  # the figures (PNG) of every notebook, beside notebook 05's tables
  for d in "$out"/figures/*/; do
    name="$(basename "$d")"
    [ "$name" = 05_analysis ] && continue
    [[ "$name" == *.shard-* ]] && continue  # a shard's partial view; the final run made the whole one
    mkdir -p "$reference/$name"
    cp "$d"*.png "$reference/$name/" 2>/dev/null || true
    cp "$d"*.csv "$reference/$name/" 2>/dev/null || true
  done
  echo "reference results copied to $reference"
fi
echo "done: executed notebooks in $out/executed, figures in $out/figures"
if [ -n "$tag" ]; then
  again=(./run_all.sh --profile "$profile" --out "$out" --device "$device")
  [ -n "$data_dir" ] && again+=(--data-dir "$data_dir")
  [ -n "$threads" ] && again+=(--threads "$threads")
  [ "$cpu_isa" = native ] && again+=(--cpu-isa native)
  again+=("${grid_train[@]}")
  echo "shard $shard done. Once all $n_shard shards are done, run once (it reuses every finished run):"
  printf '  %s\n' "$(printf '%q ' "${again[@]}")"
fi
