#!/usr/bin/env bash
# The GPU checks of one short device session, in one call (about 8 minutes on an H100):
# attention parity and speed, the train-step grid (layer loop rolled / unrolled, XLA's
# dynamic-slice fusion off / on) and decoding. Tables go to stdout and to $OUT (default /tmp/gpu).
#   bash benchmarks/gpu_session.sh
set -o pipefail
out=${OUT:-/tmp/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
train="python3 benchmarks/train_step.py --model llama3.2-1b --seq-len 4096 --steps 5"
timeout 60 python3 benchmarks/attention.py --seq-len 4096 --impl xla,cudnn 2>&1 | tee "$out/attention.txt"
timeout 180 $train --batch-size 2,4 --unroll 1,0 2>&1 | tee "$out/train.txt"
XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true timeout 120 $train --batch-size 4 --unroll 1,0 2>&1 \
    | tee "$out/train_dsf.txt"
timeout 100 python3 benchmarks/decode.py --unroll 0 2>&1 | tee "$out/decode_unrolled.txt"
XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true timeout 100 python3 benchmarks/decode.py 2>&1 \
    | tee "$out/decode_dsf.txt"
