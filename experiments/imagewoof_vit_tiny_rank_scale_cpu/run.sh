#!/usr/bin/env bash
# Rank and scale separated, on the setting of experiments/imagewoof_vit_tiny_cpu/ (conf/exp/imagewoof_vit_tiny.yaml):
# LoRA on q,v at ranks 1-32 under three scaling rules that agree at r=8 (scale 1):
#   alpha fixed at 8 (that study's rank sweep): scale alpha/r = 8/r falls as the rank grows;
#   rsLoRA with alpha = 2*sqrt(2): scale alpha/sqrt(r) = sqrt(8/r) falls more slowly;
#   alpha = r: scale 1 at every rank.
# The r=8 point is one run shared by all three lines, so the two other rules train r = 1, 4, 16, 32 only. The
# learning rate is the one the Imagewoof study chose for LoRA on its validation split
# (experiments/imagewoof_vit_tiny_cpu/lr_search/report.md): 3e-3.
# Usage: experiments/imagewoof_vit_tiny_rank_scale_cpu/run.sh DIR_WITH_OFFLINE_ASSETS [OUT]
#   DIR_WITH_OFFLINE_ASSETS holds data/imagewoof/imagewoof2-160.tar and
#   weights/vit_tiny_patch16_224.tinyimagenet_ft.safetensors.
source experiments/common.sh "$1"
out=${2:-outputs/study_imagewoof_vit_tiny_rank_scale}
train() {
  offline_multirun +exp=imagewoof_vit_tiny optim.lr=3e-3 model.checkpoint="$vit_tiny_weights" \
    data.archive="$imagewoof_archive" "$@"
}
ranks=lora.rank=1,4,16,32
train lora.rank=1,4,8,16,32 hydra.sweep.dir="$out/alpha_8"
train "$ranks" lora=rslora lora.alpha=2.8284271247461903 hydra.sweep.dir="$out/rslora"
# alpha=null means alpha = rank; the experiment name keeps this line apart from the fixed-alpha one in the plot.
train "$ranks" lora.alpha=null exp_name=imagewoof_vit_tiny_alpha_r hydra.sweep.dir="$out/alpha_r"
# The committed report.md and report.png were later redrawn from the committed report.csv
# (python -m lora_vision.report --from-csv); README.md gives the command.
$py -m lora_vision.report "$out" --out "$here" \
  --title "Rank and scale separated: ViT-Ti q,v on Imagewoof (112 px, 1k train images, 3 epochs)"
