#!/usr/bin/env bash
# Pack what a bare GPU image lacks for tools/gpu_check.py into one folder to carry (run this on a
# machine with the package index; the GPU machine is offline):
#
#   tools/gpu_bundle.sh [CUDA_VERSION] [OUT]      # e.g. tools/gpu_bundle.sh 128 gpu-bundle
#
# CUDA_VERSION is torch.version.cuda on the GPU machine without the dot (12.8 -> 128; default 128).
# OUT (default gpu-bundle) gets:
#   wheels/   peft, scipy, accelerate wheels for the GPU machine's Python (cp$PYVER, manylinux x86_64)
#             and a trimmed bitsandbytes wheel
#   site/     the same unpacked: on the GPU machine, `PYTHONPATH=OUT/site python tools/gpu_check.py`
# bitsandbytes' wheel carries a CUDA library for every CUDA version (~100s of MB); only
# libbitsandbytes_cuda$CUDA_VERSION.so (and the CPU library) is kept (a 7 MB wheel for 0.50.2 with CUDA 12.8).
# Set PYVER (default: this python's, e.g. 311) to the GPU machine's Python version.
set -euo pipefail
CUDA_VERSION="${1:-128}"
OUT="${2:-gpu-bundle}"
PYTHON="${PYTHON:-python3}"
PYVER="${PYVER:-$($PYTHON -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')}"
BNB="${BNB_VERSION:-0.50.2}"
PEFT="${PEFT_VERSION:-0.21.2}"
mkdir -p "$OUT/wheels" "$OUT/site"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --no-deps: torch, transformers, numpy and their kin are on the GPU image already.
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --dest "$tmp" "bitsandbytes==$BNB" "peft==$PEFT" scipy accelerate

for wheel in "$tmp"/*.whl; do
  case "$(basename "$wheel")" in
    bitsandbytes-*)
      unpacked="$tmp/bnb"
      "$PYTHON" -m zipfile -e "$wheel" "$unpacked"
      find "$unpacked/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cpu.so' \
          ! -name "libbitsandbytes_cuda${CUDA_VERSION}.so" -delete   # other CUDA, ROCm, XPU builds
      if ! ls "$unpacked/bitsandbytes/libbitsandbytes_cuda${CUDA_VERSION}.so" >/dev/null 2>&1; then
        echo "gpu_bundle: bitsandbytes $BNB has no libbitsandbytes_cuda${CUDA_VERSION}.so; choose another CUDA_VERSION" >&2
        exit 2
      fi
      # RECORD must not list the deleted libraries; then zip the tree back into a wheel.
      "$PYTHON" - "$unpacked" "$OUT/wheels/$(basename "$wheel")" <<'PY'
import pathlib, sys, zipfile
src, dest = pathlib.Path(sys.argv[1]), sys.argv[2]
for record in src.glob("*.dist-info/RECORD"):
    lines = record.read_text().splitlines()
    record.write_text("".join(l + "\n" for l in lines if (src / l.split(",")[0]).exists() or l.startswith(record.parent.name)))
with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        z.write(f, f.relative_to(src).as_posix())
PY
      cp -r "$unpacked"/. "$OUT/site/"
      ;;
    *)
      cp "$wheel" "$OUT/wheels/"
      "$PYTHON" -m zipfile -e "$wheel" "$OUT/site"
      ;;
  esac
done
du -sh "$OUT/wheels" "$OUT/site"
echo "gpu_bundle: carry $OUT; on the GPU machine: PYTHONPATH=$OUT/site python tools/gpu_check.py"
