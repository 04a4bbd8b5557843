#!/usr/bin/env bash
# The LoRA family on the CPU study's setting (conf/exp/cifar10_effnet.yaml: EfficientNet-Lite0, CIFAR-10 at 64 px,
# 5k training images, 3 epochs, pointwise convs at rank 8, alpha 8): each variant against plain LoRA and BitFit,
# then spectra and post-hoc rank truncation (scored on the 1,000-image validation split) of the plain rank-8 adapter.
# Usage: experiments/lora_family_cpu/run.sh DIR_WITH_OFFLINE_ASSETS [OUT]
#   DIR_WITH_OFFLINE_ASSETS holds data/cifar10/cifar10-jpeg.tar.gz and weights/tf_efficientnet_lite0.in1k.safetensors.
set -euo pipefail
assets=$(realpath "$1")
out=${2:-outputs/study_lora_family}
here=experiments/lora_family_cpu
train() {
  HF_HUB_OFFLINE=1 .venv/bin/python -m lora_vision.train -m +exp=cifar10_effnet \
    model.checkpoint="$assets/weights/tf_efficientnet_lite0.in1k.safetensors" \
    data.archive="$assets/data/cifar10/cifar10-jpeg.tar.gz" "$@"
}
train lora=lora,dora,pissa,rslora,loraplus,bitfit hydra.sweep.dir="$out/variants"
# The committed report.md and report.png were later redrawn from the committed report.csv
# (python -m lora_vision.report --from-csv); README.md gives the command.
.venv/bin/python -m lora_vision.report "$out" --out "$here" \
  --title "The LoRA family on EfficientNet-Lite0, CIFAR-10 (64 px, 5k train images, 3 epochs, CPU)"
.venv/bin/python -m lora_vision.analyze "$out/variants/0" --split val --out "$here/analysis_lora_r8"
