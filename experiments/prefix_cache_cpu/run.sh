#!/usr/bin/env bash
# A LoRA rank sweep on EfficientNet-Lite0 / CIFAR-10 (conf/exp/cifar10_effnet.yaml) with adapters in the last block
# only and no augmentation, once without and once with perf.cache_prefix; then the timings and the per-run
# differences (compare.py). The cached sweep starts from an empty cache, so its first run pays the miss.
# Usage: experiments/prefix_cache_cpu/run.sh DIR_WITH_OFFLINE_ASSETS [OUT]
#   DIR_WITH_OFFLINE_ASSETS holds data/cifar10/cifar10-jpeg.tar.gz and weights/tf_efficientnet_lite0.in1k.safetensors.
set -euo pipefail
assets=$(realpath "$1")
out=${2:-outputs/prefix_cache_cpu}
if [ -e "$out" ]; then
  echo "$out exists; pass a fresh OUT directory (the comparison needs an empty cache)" >&2
  exit 1
fi
mkdir -p "$out"
sweep() {
  local name=$1
  shift
  local started
  started=$(date +%s.%N)  # seconds of the whole multirun, Python start-up and imports included
  HF_HUB_OFFLINE=1 .venv/bin/python -m lora_vision.train -m +exp=cifar10_effnet \
    model.checkpoint="$assets/weights/tf_efficientnet_lite0.in1k.safetensors" \
    data.archive="$assets/data/cifar10/cifar10-jpeg.tar.gz" \
    'lora.blocks=-1:' lora.rank=1,2,4,8 hydra.sweep.dir="$out/$name" "$@"
  echo "$name $started $(date +%s.%N)" >>"$out/sweep_times.txt"
}
sweep uncached
sweep cached perf.cache_prefix=true perf.cache_dir="$out/cache"
.venv/bin/python experiments/prefix_cache_cpu/compare.py "$out"
