#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, for a lent GPU machine, in one call:
#   bash benchmarks/gpu_suite.sh [cudatests] [step] [cifarstep] [v3step] [augment] [r50] [r50threads] [cifar]
# (default: all, ~15 min on an H100 before v3step, which adds about 3 more)
# A lent machine runs one command for at most 10 minutes, and a session has 15 device minutes in all (start-up
# included): use two calls on the warm machine, the sections not yet measured first (BENCHMARKS.md lists them),
#   bash benchmarks/gpu_suite.sh cifarstep r50threads      then      bash benchmarks/gpu_suite.sh cudatests r50 cifar
# (step and augment were measured on 2026-11-27; rerun them when their code changes).
# Its Python has torch, timm, transformers and accelerate but not `datasets`: carry wheels in .whl/ (git-ignored)
# first, here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 timm==1.0.31 huggingface-hub==2.4.0 \
#     httpx2==2.16.2 httpcore2==2.16.2 truststore accelerate==1.15.0
# then run it with carry [".whl"]. Full logs land in $OUT (or ./bench-out); the tables are printed, then one summary
# table against the issue's targets (benchmarks/summarize.py; pass both folders when the suite ran in two calls).
# SMOKE=1 runs every section at toy sizes (CPU, a few minutes) to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}; mkdir -p "$out"
sections=${*:-cudatests step cifarstep v3step augment r50 r50threads cifar}
if [ -d .whl ] && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
py=${PYTHON:-python3}
workers=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/env.txt"
$py -c "import torch, torchvision, timm, transformers, datasets, accelerate as a
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__,
      'transformers', transformers.__version__, 'datasets', datasets.__version__, 'accelerate', a.__version__)" \
  | tee -a "$out/env.txt"
table() { grep -E '^(\||device|first|ratio|implementation|moco_hf|official|compile)' "$1"; }
run() {  # name, timeout in seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "== $name: exit $?, $((SECONDS - start)) s"
  table "$out/$name.txt"
}
if [ -n "${SMOKE:-}" ]; then  # toy sizes
  r50=(--images 64 --unique 8 --width 80 --height 60 --size 32 --batch 16 --backbone test_resnet --steps 8 --batches 2)
  cifar=(--images 256 --unique 32 --width 32 --height 32 --size 32 --batch 32 --backbone test_resnet --steps 8
         --batches 4 --bn_splits 8)
  step=(--backbone test_resnet --batch 16 --image-size 32 --queue-size 64 --steps 1 --repeats 2)
  cifarstep=(--backbone test_resnet --batch 16 --image-size 32 --queue-size 64 --steps 1 --repeats 2 --bn-splits 8)
  v3step=(--backbone test_vit --backbone-kwargs '{"img_size": 32}' --image-size 32 --mlp-hidden 64 --steps 1
          --repeats 2)
  v3batch=16; v3large=32
  augment=(--batch 8 --size 32 --iters 2 --height 48 --width 64)
  big=600; workers=1
else
  # ResNet-50, v2, 224 px, batch 256, K 65,536: one epoch of 16,384 rows (512 distinct 500x375 JPEGs), 48 steps.
  r50=(--images 16384 --unique 512 --size 224 --batch 256 --backbone resnet50 --steps 48 --batches 12
       --queue_size 65536)
  # CIFAR ResNet-18 (3x3 stem), 32 px, batch 512, K 4096, split BN over 8 chunks: 50,000 images, 160 steps.
  cifar=(--images 50000 --unique 2048 --width 32 --height 32 --size 32 --batch 512 --backbone cifar_resnet18
         --steps 160 --batches 40 --bn_splits 8)
  step=(--backbone resnet50 --batch 256 --image-size 224 --queue-size 65536 --steps 3 --repeats 6)
  # the CIFAR-10 demo's step: ResNet-18 (3x3 stem), batch 512, K 4096, split BN over 8 chunks
  cifarstep=(--backbone cifar_resnet18 --batch 512 --image-size 32 --queue-size 4096 --steps 10 --repeats 6
             --bn-splits 8)
  # MoCo v3, ViT-S/16 with the released 12 heads and heads (4096 hidden, 256 out), 224 px
  v3step=(--backbone vit_small_patch16_224 --backbone-kwargs '{"num_heads": 12}' --image-size 224 --steps 3
          --repeats 6)
  # batch 256, and the largest estimated to fit 80 GB in bf16: 2048 with gradient checkpointing (about 18 MiB saved
  # for backward per image instead of 84: benchmarks/bench_grad_checkpointing.py --v3 --amp on a CPU)
  v3batch=256; v3large=2048
  augment=()
  big=300
fi
for section in $sections; do
  case $section in
    cudatests)  # the tests that need CUDA (CUDA graphs against eager, augmentation and nvJPEG on the device)
      run cuda_tests $big $py -m pytest -q -rs -p no:cacheprovider tests/test_model.py tests/test_gpu_augment.py \
        -k cuda
      tail -n 3 "$out/cuda_tests.txt" ;;
    step)  # model step: official-style fp32 baseline vs moco_hf bf16 + channels_last + torch.compile
      run step_r50_compile $big $py benchmarks/bench_model_step.py "${step[@]}" --amp --channels-last --compile \
        --baseline-fp32 ;;
    cifarstep)  # the CIFAR step alone: the demo's code in fp32 vs moco_hf compiled; then moco_hf without split BN
      run step_cifar_compile $big $py benchmarks/bench_model_step.py "${cifarstep[@]}" --amp --channels-last \
        --compile --baseline-fp32 --cudnn-benchmark
      run step_cifar_compile_nosplit $big $py benchmarks/bench_model_step.py "${cifarstep[@]}" --bn-splits 1 \
        --amp --channels-last --compile --cudnn-benchmark
      # and with CUDA graphs (compile_mode reduce-overhead): how much of the step is host-side launch work
      run step_cifar_cudagraphs $big $py benchmarks/bench_model_step.py "${cifarstep[@]}" --amp --channels-last \
        --compile --compile-mode reduce-overhead --baseline-fp32 --cudnn-benchmark ;;
    v3step)  # MoCo v3 ViT-S/16: a naive Algorithm 1 in fp32 vs moco_hf compiled in bf16; then the largest batch,
      # both in bf16 with gradient checkpointing of the query backbone
      run step_v3_vits $big $py benchmarks/bench_model_step.py --v3 "${v3step[@]}" --batch $v3batch --amp --compile \
        --baseline-fp32
      run step_v3_vits_large $big $py benchmarks/bench_model_step.py --v3 "${v3step[@]}" --batch $v3large --amp \
        --compile --grad-checkpointing ;;
    augment)  # the batched v2 augmentation alone, eager vs compiled, 256 images of 500 x 375
      run augment_v2 $big $py benchmarks/bench_augment.py "${augment[@]}" ;;
    r50)  # pretrain.py end to end from JPEG bytes: workers decode, the device augments, compiled encoders
      run e2e_r50_compile $big $py benchmarks/bench_pipeline.py "${r50[@]}" --preset v2 --workers $workers \
        --mixed_precision bf16 --channels_last --compile --paths device --profile_steps 3 --profile_out "$out" ;;
    r50threads)  # the same, workers only reading bytes and threads of the training process decoding
      run e2e_r50_threads_compile $big $py benchmarks/bench_pipeline.py "${r50[@]}" --preset v2 --workers 4 \
        --device_decode threads --mixed_precision bf16 --channels_last --compile --paths device --skip_pipeline ;;
    cifar)  # CIFAR: the split decoded once into device memory, then augmented and trained from there
      run e2e_cifar_cache_compile $big $py benchmarks/bench_pipeline.py "${cifar[@]}" --preset cifar \
        --workers $workers --mixed_precision bf16 --channels_last --compile --paths cache --profile_steps 3 \
        --profile_out "$out"
      run e2e_cifar_cache_cudagraphs $big $py benchmarks/bench_pipeline.py "${cifar[@]}" --preset cifar \
        --workers $workers --mixed_precision bf16 --channels_last --compile --compile_mode reduce-overhead \
        --paths cache --skip_pipeline ;;
    *) echo "unknown section $section (cudatests, step, cifarstep, v3step, augment, r50, r50threads, cifar)"; exit 2 ;;
  esac
done
echo "== summary (python3 benchmarks/summarize.py $out)"
$py benchmarks/summarize.py "$out" | tee "$out/summary.txt"
