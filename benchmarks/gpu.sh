#!/usr/bin/env bash
# The GPU benchmarks in one short run (paper sizes, bfloat16), logs under ${OUT:-/tmp/gpu_bench}.
#
#   bash benchmarks/gpu.sh
#
# If a folder .whl/ of wheels exists (packages the GPU machine lacks: grain, pydicom, ...; made here
# by `bash benchmarks/gpu_wheels.sh`, carried with the device call), they are installed to
# /tmp/site first. Each benchmark has its own time limit so one slow part cannot
# starve the others. The whole script takes longer than one 10-minute device call: choose parts,
# e.g. `TRAIN_RUNS=none bash benchmarks/gpu.sh` (inference only, ~5 min) or
# `INFER_S=0 TRAIN_RUNS="multi_head:32" bash benchmarks/gpu.sh`.
set -u -o pipefail
out=${OUT:-/tmp/gpu_bench}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint, grain, pydicom; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
  || exit 1

# 1. two-stage inference from full-size (512 px) DICOM studies, 5-fold ensembles, bf16, with
#    decoder processes (the reader was the bottleneck with one thread; DECODERS=0,14 compares).
#    ~100 studies: with 14 decoders their start (~15 s on an H200 host) is a small part, and the
#    rate after the first results (printed too) is what a long test set sees.
[ "${INFER_S:-300}" != 0 ] && timeout "${INFER_S:-300}" python3 benchmarks/inference.py --paper --dtype bfloat16 --size full \
  --num_studies "${STUDIES:-96}" --folds 5 --batch_size 64 --decode_workers "${DECODERS:-14}" \
  2>&1 | tee "$out/inference.log"
# 2. train / eval step of every model at paper size in bf16, images/s and MFU, grain with the
#    host's cores; the larger batches show how far the chip is from saturation at the paper's.
for spec in ${TRAIN_RUNS:-stage2:8 stage2:32 stage1:32 stage1:128 multi_head:32}; do
  [ "$spec" = none ] && break
  timeout "${TRAIN_S:-150}" python3 benchmarks/train_step.py --paper_only --dtype bfloat16 \
    --configs "${spec%%:*}" --batch_size "${spec##*:}" --workers "${WORKERS:-14}" --steps 10 \
    --input_batches 10 2>&1 | tee -a "$out/train_step.log"
done
# 3. shifted vs lax depthwise conv (and the atto stage-2 model) at 224 px: which path is faster.
if [ -n "${DEPTHWISE:-}" ]; then
  timeout 120 python3 benchmarks/depthwise_conv.py --size 224 --batch 16 --repeats 3 2>&1 \
    | tee "$out/depthwise.log"
fi
