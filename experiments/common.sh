# Sourced by the studies' run.sh, from the repository root, with the directory of offline assets as its argument:
#   source experiments/common.sh DIR_WITH_OFFLINE_ASSETS
# It sets `here` (the study's folder), `assets`, `py`, the paths of the files the studies use (`vit_tiny_weights`, `cifar10_archive`,
# `imagewoof_archive`), and defines `offline_multirun` (a multirun that never reaches the
# Hugging Face hub, so a missing local file is an error instead of a download attempt) and `timed`.
set -euo pipefail
here=$(dirname "$0")
assets=$(realpath "$1")
py=.venv/bin/python
vit_tiny_weights=$assets/weights/vit_tiny_patch16_224.tinyimagenet_ft.safetensors
cifar10_archive=$assets/data/cifar10/cifar10-jpeg.tar.gz
imagewoof_archive=$assets/data/imagewoof/imagewoof2-160.tar

offline_multirun() {
  HF_HUB_OFFLINE=1 $py -m lora_vision.train -m "$@"
}

timed() {  # timed FILE COMMAND...: COMMAND offline, its wall time (s) and peak resident memory (KiB) written to FILE
  local file=$1
  shift
  mkdir -p "$(dirname "$file")"
  /usr/bin/time -f "%e %M" -o "$file" env HF_HUB_OFFLINE=1 "$@"
}
