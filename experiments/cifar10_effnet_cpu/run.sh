#!/usr/bin/env bash
# The study's exact commands: LoRA ranks and target sets against the linear probe and full fine-tuning, on
# EfficientNet-Lite0 (ImageNet-1k) and CIFAR-10 (conf/exp/cifar10_effnet.yaml), then the report.
# Usage: experiments/cifar10_effnet_cpu/run.sh DIR_WITH_OFFLINE_ASSETS [OUT]
#   DIR_WITH_OFFLINE_ASSETS holds data/cifar10/cifar10-jpeg.tar.gz and weights/tf_efficientnet_lite0.in1k.safetensors.
set -euo pipefail
assets=$(realpath "$1")
out=${2:-outputs/study_cifar10_effnet}
train() {
  HF_HUB_OFFLINE=1 .venv/bin/python -m lora_vision.train -m +exp=cifar10_effnet \
    model.checkpoint="$assets/weights/tf_efficientnet_lite0.in1k.safetensors" \
    data.archive="$assets/data/cifar10/cifar10-jpeg.tar.gz" "$@"
}
train lora=linear_probe seed=42,1 hydra.sweep.dir="$out/linear_probe"
train 'lora.targets=[conv1x1]' lora.rank=1,2,4,8,16 hydra.sweep.dir="$out/lora_conv1x1"
train 'lora.targets=[conv1x1]' lora.rank=1,2,4,8,16 seed=1 hydra.sweep.dir="$out/lora_conv1x1_seed1"
train 'lora.targets=[all_convs]' lora.rank=2,8 hydra.sweep.dir="$out/lora_all_convs"
train 'lora.targets=[conv1x1]' lora.blocks=-3: lora.rank=8 hydra.sweep.dir="$out/lora_conv1x1_last3"
train lora=full optim.lr=5e-4 seed=42,1 hydra.sweep.dir="$out/full"
# The committed report.md and report.png were later redrawn from the committed report.csv
# (python -m lora_vision.report --from-csv); README.md gives the command.
.venv/bin/python -m lora_vision.report "$out" --out experiments/cifar10_effnet_cpu \
  --title "EfficientNet-Lite0 on CIFAR-10 (64 px, 5k train images, 3 epochs, CPU)"
