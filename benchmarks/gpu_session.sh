#!/usr/bin/env bash
# The GPU checks of one short device session, in one call (at most 9 minutes: give it a 570 s
# timeout): attention parity and speed (XLA, cuDNN, tokamax), the llama3.2-1b train-step grid (layer
# loop rolled / unrolled, cuDNN / tokamax attention, batch 4 and 8) and one profiled step. Tables go
# to stdout and to $OUT (default /tmp/gpu); the profile to $OUT/profile.
#   bash benchmarks/gpu_session.sh
# Python wheels that the GPU machine lacks (grain and what it needs, tensorboardX, tokamax and what
# it needs, for its Python) can sit in ./.whl (git-ignored, e.g. from `pip download --no-deps
# --only-binary=:all: --python-version 3.12 -d .whl ...`); they are installed into /tmp/site first.
set -o pipefail
out=${OUT:-/tmp/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
train="python3 benchmarks/train_step.py --model llama3.2-1b --seq-len 4096 --steps 5"
timeout 90 python3 benchmarks/attention.py --seq-len 4096 --impl xla,cudnn,tokamax 2>&1 | tee "$out/attention.txt"
timeout 200 $train --batch-size 4 --unroll 1,0 --attention cudnn,tokamax 2>&1 | tee "$out/train_b4.txt"
timeout 150 $train --batch-size 8 --unroll 0 --attention cudnn,tokamax 2>&1 | tee "$out/train_b8.txt"
timeout 90 $train --batch-size 8 --unroll 0 --steps 2 --warmup 1 --profile "$out/profile" 2>&1 | tee "$out/profile.txt"
