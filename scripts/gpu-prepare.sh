#!/usr/bin/env bash
# Fill gpu-check/ (ignored by git) with what `python -m psi.check` needs on a GPU machine that has its
# own Python and torch but no network: the CIFAR-10 JPEG archive, and wheels of the pure-Python
# packages the check imports that such a machine may lack (none today: the check needs torch, numpy,
# scipy, pandas, pillow and pytest, which the CUDA images this project meets carry; torchvision for
# the nvjpeg stage). Then, on the GPU machine, from the checkout's root:
#
#   PYTHONPATH=. python3 -m psi.check --out gpu-check/check.json      # 8 minutes at most
#
# Usage: scripts/gpu-prepare.sh [FOLDER_WITH_cifar10-jpeg.tar.gz]   (default ../shared/data, else $PSI_DATA)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-}"
if [[ -z "$src" ]]; then
  for d in ../shared/data "${PSI_DATA:-}" data; do
    [[ -n "$d" && -f "$d/cifar10-jpeg.tar.gz" ]] && { src="$d"; break; }
  done
fi
if [[ -z "$src" || ! -f "$src/cifar10-jpeg.tar.gz" ]]; then
  echo "gpu-prepare: no cifar10-jpeg.tar.gz found (looked in ${1:-../shared/data, \$PSI_DATA, data}); pass its folder" >&2
  exit 2
fi
want=efac85c8ed52f4ead1e1f1b670d8dcf435d551fccebdd8b6365e0a01a504f3a4
got=$(sha256sum "$src/cifar10-jpeg.tar.gz" | cut -d' ' -f1)
if [[ "$got" != "$want" ]]; then
  echo "gpu-prepare: $src/cifar10-jpeg.tar.gz has sha256 $got, not $want: a damaged copy; fetch it again" >&2
  exit 2
fi
mkdir -p gpu-check/data
cp "$src/cifar10-jpeg.tar.gz" gpu-check/data/
# the pure-Python packages the check imports beyond a CUDA image's (add a name here if the check grows one)
WHEELS=()
if (( ${#WHEELS[@]} )); then
  python3 -m pip download -q --no-deps --only-binary=:all: -d gpu-check/wheels "${WHEELS[@]}"
fi
du -sh gpu-check
echo "gpu-prepare: ready. On the GPU machine: PYTHONPATH=. python3 -m psi.check --out gpu-check/check.json"
