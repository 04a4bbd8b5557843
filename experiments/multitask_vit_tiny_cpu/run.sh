#!/usr/bin/env bash
# The study's exact commands: a pretrained ViT-Ti on Imagewoof and CIFAR-10 at 224 px, both with the single-task
# studies' settings (conf/exp/imagewoof_vit_tiny.yaml at data.image_size=224, conf/exp/cifar10_vit_tiny.yaml: 1,000
# class-balanced training images each, 3 epochs, LoRA r=8 on q,v, lr 3e-3, seed 42). The two single-task runs, then
# one multi-task run per sharing setting (conf/exp/multitask_vit_tiny.yaml), each timed with its peak resident
# memory (/usr/bin/time); then one mixed-batch pass over both test sets with the independent run's two adapters on
# one backbone (mixed_batch.py); then the report.
# Usage: experiments/multitask_vit_tiny_cpu/run.sh DIR_WITH_OFFLINE_ASSETS [OUT]
#   DIR_WITH_OFFLINE_ASSETS holds data/imagewoof/imagewoof2-160.tar, data/cifar10/cifar10-jpeg.tar.gz and
#   weights/vit_tiny_patch16_224.tinyimagenet_ft.safetensors.
source experiments/common.sh "$1"
out=$(realpath -m "${2:-outputs/study_multitask_vit_tiny}")
mkdir -p "$out"
train() {  # train NAME OVERRIDES...: one run in $out/NAME, its wall time (s) and peak RSS (KiB) in $out/NAME.time
  local name=$1
  shift
  timed "$out/$name.time" $py -m lora_vision.train model.checkpoint="$vit_tiny_weights" "$@" hydra.run.dir="$out/$name"
}
tasks=(multitask.tasks.woof.data.archive="$imagewoof_archive" multitask.tasks.cifar.data.archive="$cifar10_archive")

train single/woof +exp=imagewoof_vit_tiny data.image_size=224 data.archive="$imagewoof_archive"
train single/cifar +exp=cifar10_vit_tiny data.archive="$cifar10_archive"
train multitask/independent +exp=multitask_vit_tiny "${tasks[@]}"
train multitask/shared +exp=multitask_vit_tiny "${tasks[@]}" multitask.sharing=shared
# Shared rank 4 plus task rank 4: the same rank per task (8) as the other two settings.
train multitask/shared_specific +exp=multitask_vit_tiny "${tasks[@]}" multitask.sharing=shared_specific \
  multitask.shared_rank=4 lora.rank=4 lora.alpha=4
$py "$here/mixed_batch.py" "$out/multitask/independent" --checkpoint "$vit_tiny_weights" \
  --archive woof="$imagewoof_archive" --archive cifar="$cifar10_archive" > "$out/mixed_batch.json"
$py "$here/table.py" "$out" > "$here/results.md"
