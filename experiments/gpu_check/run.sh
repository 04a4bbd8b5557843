#!/usr/bin/env bash
# The GPU check, in one go on a machine with one CUDA GPU, from the repository root. Its steps run under time limits
# that add up to 9 min 50 s; it has not run on a GPU yet, so no run time is measured.
#   bash experiments/gpu_check/run.sh DIR_WITH_OFFLINE_ASSETS [OUT]      (OUT defaults to experiments/gpu_check/results)
#
# Expects installed: a CUDA build of torch with torchvision, timm, lightning, peft, and lora_vision with its
# pure-Python dependencies (hydra-core, omegaconf, torchmetrics, safetensors, optuna, matplotlib, ...). A machine
# without internet gets the latter from wheels carried beside the checkout: on a connected machine,
#   pip download -d wheels --no-deps hydra-core omegaconf antlr4-python3-runtime==4.9.3 optuna alembic ...
# then on the GPU machine `pip install --no-index --find-links wheels --no-deps -e .` (plus the wheels).
# The assets folder holds, as for the CPU studies (experiments/common.sh):
#   data/cifar10/cifar10-jpeg.tar.gz                                 CIFAR-10 as JPEGs in ImageFolder layout
#   weights/vit_tiny_patch16_224.tinyimagenet_ft.safetensors         a pretrained ViT-Ti
# Each step runs under its own time limit and the script goes on when one fails; status.tsv says how each ended.
set -uo pipefail
cd "$(dirname "$0")/../.."
source experiments/common.sh "$1"
set +e
out=$(realpath -m "${2:-experiments/gpu_check/results}")
mkdir -p "$out"
py=${PYTHON:-python}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
printf 'step\texit status\tseconds\n' > "$out/status.tsv"

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output in OUT/NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
  printf '%s\t%s\t%s\n' "$name" "$?" "$((SECONDS - start))" >> "$out/status.tsv"
}

step machine 30 bash -c "nvidia-smi; $py -c 'import torch, timm, lightning, peft; print(torch.__version__, torch.version.cuda, timm.__version__, lightning.__version__, peft.__version__)'"
# The CUDA tests: fused node (fp32, fp16 and bf16 autocast), merge/export, DoRA, PiSSA, resize, short runs.
step gpu_tests 75 $py -m pytest -q -m gpu -rs -p no:cacheprovider --junitxml "$out/gpu_tests.xml"
# LoRA step time against its floor and PEFT, peak memory, merged against base inference: ViT-B/16, ResNet-50 and
# EfficientNet-Lite0 (its depthwise convs included), each comparison in 3 runs as on the CPU.
for precision in fp32 bf16; do
  step "bench_$precision" 70 $py -m lora_vision.bench --device cuda --precision "$precision" --repeats 3 --runs 3 \
    --configs vit_b16/qkv vit_b16/qv vit_b16/all_linear resnet50/conv3x3 resnet50/all_convs effnet_lite0/conv1x1 \
    effnet_lite0/all_convs --options --out "$out/bench_$precision"
done
# Several adapters on one backbone: a mixed batch of N = 1, 2, 4, 8 adapters routed in one pass against N merged
# models and against switching; a packed N-point training step against N separate steps (--train).
step multi_adapter 35 $py -m lora_vision.bench.multi --device cuda --batch-size 64 --repeats 3 \
  --configs vit_b16/qv resnet50/conv3x3 --out "$out/multi_adapter"
step packed_training 35 $py -m lora_vision.bench.multi --train --device cuda --repeats 3 \
  --configs vit_b16/qv resnet50/conv3x3 --out "$out/packed_training"
# The input pipeline against the model's images/s for the CIFAR-at-224 experiments.
step data_pipeline 35 $py -m lora_vision.bench.data --device cuda --experiments vit_r8 --out "$out/data_pipeline"
# The main job's pipeline at full size: ViT-B/16 at 224 (random init) on CIFAR-10, 300 steps, images/s and memory.
for precision in 16-mixed bf16-mixed; do
  step "main_job_$precision" 40 $py -m lora_vision.train +exp=vit_r8 data=cifar10 data.archive="$cifar10_archive" \
    model.pretrained=false trainer.precision="$precision" trainer.max_steps=300 trainer.limit_val_batches=10 \
    test=false hydra.run.dir="$out/main_job_$precision"
done
# Real data: the pretrained ViT-Ti, LoRA on q,v (r=8) against full fine-tuning, the full CIFAR-10 training set
# at 224 px (conf/exp/cifar10_vit_tiny_gpu.yaml), 2 epochs each, at the learning rates of the CPU study.
for method in "lora 3e-3" "full 3e-4"; do
  set -- $method
  step "vit_tiny_cifar10_$1" 80 $py -m lora_vision.train +exp=cifar10_vit_tiny_gpu lora="$1" optim.lr="$2" \
    model.checkpoint="$vit_tiny_weights" data.archive="$cifar10_archive" trainer.max_epochs=2 \
    hydra.run.dir="$out/vit_tiny_cifar10/$1"
done
$py -m lora_vision.report "$out/vit_tiny_cifar10" --title "A pretrained ViT-Ti on CIFAR-10 (224 px, 50k train images, 2 epochs, GPU)" \
  > "$out/vit_tiny_cifar10/report.log" 2>&1
cat "$out/status.tsv"
