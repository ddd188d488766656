#!/usr/bin/env bash
# Fetches into .whl/ (git-ignored) the Python 3.12 wheels that benchmarks/gpu.sh needs and the
# H200 device image lacks (it has jax, flax, optax, orbax, numpy, scipy, pandas, matplotlib, tqdm,
# timm; see /work/.library/device/KINDS.md). Run here, where pip can reach PyPI, then
#
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"])     # gpu.sh installs .whl/ first
#
# Versions come from requirements.txt, so the device runs the same readers as CI.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=.git/info/exclude
if [ -d .git ] && ! grep -qx '/.whl/' "$exclude" 2>/dev/null; then echo /.whl/ >> "$exclude"; fi
names='grain|array-record|ml-collections|pydicom|pylibjpeg|pylibjpeg-libjpeg|pylibjpeg-openjpeg|pylibjpeg-rle|pyjpegls|nibabel|tensorboardX'
pins=$(grep -E "^(${names})==" requirements.txt)
pins="$pins portpicker==1.6.0"  # grain's one need the image lacks
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms="$platforms --platform $p"
done
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $platforms -d .whl $pins
ls -1 .whl
du -sh .whl
