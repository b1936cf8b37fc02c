#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one call (about 6 minutes on one H100), for a lent GPU machine.
# Its Python has torch, timm, transformers and accelerate but not `datasets`: carry wheels in .whl/ first, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 timm==1.0.31 huggingface-hub==2.4.0 \
#     httpx2==2.16.2 httpcore2==2.16.2 truststore accelerate==1.15.0
# then run it with carry [".whl"]:  bash benchmarks/gpu_suite.sh
# Full logs land in $OUT (or ./bench-out); the tables are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}; mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/env.txt"
python3 -c "import torch, torchvision, timm, transformers, datasets, accelerate as a
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__,
      'transformers', transformers.__version__, 'datasets', datasets.__version__, 'accelerate', a.__version__)" \
  | tee -a "$out/env.txt"
table() { grep -E '^(\||device|first|ratio|implementation|moco_hf|official)' "$1"; }

# 1. Model step, ResNet-50 224 px, batch 256, K 65536: official-style fp32 baseline vs moco_hf bf16 + channels_last.
timeout 120 python3 benchmarks/bench_model_step.py --backbone resnet50 --batch 256 --image-size 224 \
  --queue-size 65536 --amp --channels-last --baseline-fp32 --steps 3 --repeats 6 > "$out/step_r50.txt" 2>&1
table "$out/step_r50.txt"
# 2. The same with torch.compile of moco_hf's encoders.
timeout 180 python3 benchmarks/bench_model_step.py --backbone resnet50 --batch 256 --image-size 224 \
  --queue-size 65536 --amp --channels-last --compile --baseline-fp32 --steps 3 --repeats 6 > "$out/step_r50_compile.txt" 2>&1
table "$out/step_r50_compile.txt"
# 3. Data pipeline alone and pretrain.py end to end from JPEG bytes (v2, 224 px, ResNet-50, bf16, channels_last):
#    PIL on 14 CPU workers vs nvJPEG + batched GPU augmentation.
timeout 180 python3 benchmarks/bench_pipeline.py --images 2048 --size 224 --preset v2 --batch 256 --workers 14 \
  --backbone resnet50 --steps 16 --batches 6 --mixed_precision bf16 --channels_last > "$out/pipeline_r50.txt" 2>&1
table "$out/pipeline_r50.txt"
# 4. CIFAR ResNet-18 (3x3 stem) 32 px end to end, batched GPU path.
timeout 90 python3 benchmarks/bench_pipeline.py --images 8192 --width 32 --height 32 --size 32 --preset cifar \
  --batch 512 --workers 8 --backbone cifar_resnet18 --steps 32 --batches 8 --mixed_precision bf16 --channels_last \
  --paths device > "$out/pipeline_cifar.txt" 2>&1
table "$out/pipeline_cifar.txt"
