#!/usr/bin/env bash
# The GPU checks of issue 5 as one prepared script, for a session that is lent a GPU machine.
#
#   make gpu-bundle              # here: .gpu/ = the wheels the GPU image lacks + Fashion-MNIST (~32 MB)
#   bash benchmarks/gpu_check.sh # there, from the repository root (device tool: carry .gpu)
#
# The GPU image has python3 with torch, lightning, torchmetrics, safetensors, matplotlib and pytest, but
# not jsonargparse (LightningCLI), and no network: `make gpu-bundle` downloads jsonargparse and its
# signature extras as wheels into .gpu/wheels and copies the Fashion-MNIST idx files into
# .gpu/fashion-mnist. This script installs the wheels into /tmp (nothing else is changed), puts the
# idx files where the conv tasks read them if they are not there, then runs, each writing to $OUT
# (default runs/gpu_check):
#   env.txt                      GPU, driver, torch / CUDA / lightning / jsonargparse versions
#   cuda_tests.txt               the CUDA-only tests (skipped on CPU machines and in CI)
#   precision_throughput.{md,json}  meta-training throughput on the conv task: 32-true, bf16-mixed, 16-mixed
#   step_time.{md,json}          LearnedOptimizer.step against Adam on CUDA, 10k ... 10M parameters
#   step_time_compile.{md,json}  the same with LearnedOptimizer(compile=True) rows, 1M and 10M parameters
# Estimated at about 5 minutes on an H200 before the compile rows, which run last (each compiles afresh;
# not yet run on one). Exit status: non-zero if any step failed; every step runs regardless.
# Without a CUDA device it stops after env.txt. A dry run on a CPU machine (the CUDA tests then skip):
# ALLOW_CPU=1 THROUGHPUT_ARGS="--accelerator cpu --steps 2 --warmup 1" STEP_TIME_ARGS="--device cpu --sizes 1e4" \
#   STEP_TIME_COMPILE_ARGS="--device cpu --sizes 1e4" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/l2l_site \
        .gpu/wheels/*.whl || exit 1
    export PYTHONPATH="/tmp/l2l_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && compgen -G ".gpu/fashion-mnist/*.gz" > /dev/null; then
    mkdir -p "$FMNIST" && cp .gpu/fashion-mnist/*.gz "$FMNIST/"
fi

status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/env.txt" \
    || [ "${ALLOW_CPU:-}" = 1 ] || status=1
"$PY" -c "import sys, torch, lightning, jsonargparse, lightning_l2l
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
print('lightning', lightning.__version__, 'jsonargparse', jsonargparse.__version__)
sys.exit(0 if torch.cuda.is_available() or '${ALLOW_CPU:-}' == '1' else 'no CUDA device (ALLOW_CPU=1 for a dry run)')" \
    2>&1 | tee -a "$OUT/env.txt" || exit 1
"$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_distributed.py::test_mixed_precision_meta_training_on_gpu \
    tests/test_optim.py::test_state_dict_across_devices 2>&1 | tee "$OUT/cuda_tests.txt" || status=1
"$PY" benchmarks/precision_throughput.py --json "$OUT/precision_throughput.json" ${THROUGHPUT_ARGS:---accelerator gpu} 2>&1 \
    | tee "$OUT/precision_throughput.md" || status=1
"$PY" benchmarks/step_time.py ${STEP_TIME_ARGS:---device cuda} --json "$OUT/step_time.json" 2>&1 | tee "$OUT/step_time.md" || status=1
"$PY" benchmarks/step_time.py ${STEP_TIME_COMPILE_ARGS:---device cuda --sizes 1e6 1e7} --compile \
    --json "$OUT/step_time_compile.json" 2>&1 | tee "$OUT/step_time_compile.md" || status=1
exit $status
