#!/usr/bin/env bash
# The study's exact commands: a pretrained ViT-Ti on CIFAR-10 at 224 px (conf/exp/cifar10_vit_tiny.yaml: 1,000
# training images, 3 epochs, 1,000 test images): linear probe, LoRA q,v at ranks 1, 4 and 16, all-linear LoRA at
# rank 8 and full fine-tuning, with the learning rates the Imagewoof study chose on its validation split for the
# same backbone (experiments/imagewoof_vit_tiny_cpu/lr_search/report.md): probe 1e-3, LoRA 3e-3, full 3e-4.
# Usage: experiments/cifar10_vit_tiny_cpu/run.sh DIR_WITH_OFFLINE_ASSETS [OUT]
#   DIR_WITH_OFFLINE_ASSETS holds data/cifar10/cifar10-jpeg.tar.gz and
#   weights/vit_tiny_patch16_224.tinyimagenet_ft.safetensors.
source experiments/common.sh "$1"
out=${2:-outputs/study_cifar10_vit_tiny}
train() {
  offline_multirun +exp=cifar10_vit_tiny model.checkpoint="$vit_tiny_weights" \
    data.archive="$cifar10_archive" "$@"
}
train lora=linear_probe perf.cache_prefix=true optim.lr=1e-3 hydra.sweep.dir="$out/linear_probe"
train optim.lr=3e-3 lora.rank=1,4,16 hydra.sweep.dir="$out/lora_qv"
train optim.lr=3e-3 'lora.targets=[all_linear]' hydra.sweep.dir="$out/lora_all_linear"
train lora=full optim.lr=3e-4 hydra.sweep.dir="$out/full"
# The committed report.md and report.png were later redrawn from the committed report.csv
# (python -m lora_vision.report --from-csv); README.md gives the command.
$py -m lora_vision.report "$out" --out "$here" \
  --title "A pretrained ViT-Ti on CIFAR-10 (224 px, 1k train images, 3 epochs, 1k test images, CPU)"
