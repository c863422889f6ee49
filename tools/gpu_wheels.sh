#!/usr/bin/env bash
# Fetch the wheels tools/gpu_check.sh installs on a GPU machine that has torch but not lorakit's other packages
# (no network there): diffusers, omegaconf, and lorakit's pinned transformers / peft, plus bitsandbytes for the
# 8-bit AdamW test with only its CUDA 13 libraries kept (43 MB -> 8 MB), so the repository and the wheels stay
# under a 64 MiB transfer. Writes .whl/ (ignored by git); run from anywhere with pip and network.
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT=(--python-version "${PY_VERSION:-3.12}" --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d .whl diffusers==0.42.1 omegaconf==2.4.0 \
  antlr4-python3-runtime==4.13.2 importlib_metadata transformers==5.23.0 peft==0.21.2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$tmp" bitsandbytes==0.50.2
whl=$(ls "$tmp"/bitsandbytes-*.whl)
mkdir "$tmp/x"
(cd "$tmp/x" && python3 -m zipfile -e "$whl" . \
  && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*cpu*' -delete \
  && sed -i '/libbitsandbytes_\(rocm\|cuda1[0-2]\)/d' ./*.dist-info/RECORD \
  && rm -f "../$(basename "$whl")" && python3 -m zipfile -c "$OLDPWD/.whl/$(basename "$whl")" bitsandbytes ./*.dist-info)
du -sh .whl
