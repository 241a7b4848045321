#!/usr/bin/env bash
# Every GPU figure of the project in one device call of at most 9 minutes (give it a 570 s timeout),
# in this order: the llama3.2-1b train-step grid (sequence 4096) that decides the training defaults;
# decode.py at llama3-8b (bf16, int8, int4, speculative with a llama3.2-1b draft) beside Hugging Face
# eager; serve.py at llama3-8b with 64 concurrent 512-in/512-out requests; one profile of the decode
# step at batch 1 (the target furthest from its roofline on 2026-11-26), summarised as a table.
# Each table goes to stdout and to a file of $OUT (default /tmp/gpu): 7 files, none in a folder.
#   bash benchmarks/gpu_session.sh
#   REHEARSE=1 bash benchmarks/gpu_session.sh   # the same steps on this machine's CPU, tiny presets
# Python wheels the GPU machine lacks (grain and what it needs, for its Python) can sit in ./.whl
# (git-ignored; see device/README.md); they are installed into /tmp/site first.
set -o pipefail
out=${OUT:-/tmp/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -n "${REHEARSE:-}" ]; then  # CPU: tiny presets, short runs; every flag and file as on the GPU
    export JAX_PLATFORMS=cpu
    big=tiny small=tiny seq=128 prompt=64 ctx=64 steps=8 batches=1,4 n=16 len=16 conc=4 t=1
    echo "rehearsal on $(uname -m) CPU" | tee "$out/device.txt"
else
    big=llama3-8b small=llama3.2-1b seq=4096 prompt=2048 ctx=512 steps=64 batches=1,64 n=256 len=512 conc=64 t=0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
fi
python3 -c "import jax; print('jax', jax.__version__, jax.devices()[0].device_kind)" | tee -a "$out/device.txt"
date -u +%F | tee -a "$out/device.txt"

train="python3 benchmarks/train_step.py --model $small --seq-len $seq --steps 5"
timeout $((t ? 900 : 120)) $train --batch-size 4,8 --unroll 0,1 --attention auto 2>&1 | tee "$out/train.txt"

# JAX takes 60% of the GPU's memory, leaving the rest to PyTorch for the Hugging Face rows.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $((t ? 900 : 180)) python3 benchmarks/decode.py --model "$big" --prompts "$prompt" --batches "$batches" \
    --context "$ctx" --steps "$steps" --quantize none,int8,int4 --draft-model "$small" --draft-tokens 4 --hf \
    2>&1 | tee "$out/decode.txt"

timeout $((t ? 900 : 150)) python3 benchmarks/serve.py --model "$big" --num-requests "$n" --input-len "$len" \
    --output-len "$len" --len-sigma 0 --concurrency "$conc" --max-num-seqs "$conc" 2>&1 | tee "$out/serve.txt"

rm -rf /tmp/gpu_profile
timeout $((t ? 900 : 60)) python3 benchmarks/decode.py --model "$big" --prompts "$prompt" --batches 1 --context "$ctx" \
    --steps "$steps" --profile /tmp/gpu_profile 2>&1 | tee "$out/profile_run.txt"
python3 benchmarks/profile_summary.py /tmp/gpu_profile --steps "$((steps - 1))" 2>&1 | tee "$out/profile.txt"
