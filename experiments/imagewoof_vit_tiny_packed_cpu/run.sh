#!/usr/bin/env bash
# The study's exact commands: the committed Imagewoof q,v rank sweep (experiments/imagewoof_vit_tiny_cpu: a
# pretrained ViT-Ti at 112 px, 1,000 training images, 3 epochs, lr 3e-3, seed 42) trained packed
# (hydra/launcher=packed: the six ranks in one process, on one data stream), then sequentially on the same CPU, each
# timed with its peak resident memory; the packed sweep run a second time (every point reported, none trained); then
# seeds 1 and 2 of the rank sweep and seeds 42, 1 and 2 of the equal-budget target rows (+sweep=budget), packed; the
# report over all seeds; the comparison tables (compare.py).
# Usage: experiments/imagewoof_vit_tiny_packed_cpu/run.sh DIR_WITH_OFFLINE_ASSETS [OUT]
#   DIR_WITH_OFFLINE_ASSETS holds data/imagewoof/imagewoof2-160.tar and
#   weights/vit_tiny_patch16_224.tinyimagenet_ft.safetensors.
source experiments/common.sh "$1"
out=$(realpath -m "${2:-outputs/study_imagewoof_vit_tiny_packed}")
sweep() {  # sweep NAME OVERRIDES...: one multirun in $out/NAME, its wall time (s) and peak RSS (KiB) in $out/NAME.time
  local name=$1
  shift
  timed "$out/$name.time" $py -m lora_vision.train -m +exp=imagewoof_vit_tiny model.checkpoint="$vit_tiny_weights" \
    data.archive="$imagewoof_archive" "$@" hydra.sweep.dir="$out/$name"
}
ranks=lora.rank=1,2,4,8,16,32
budget=(+sweep=budget 'sweep/budget_points@_global_=qkv_fused_r8,attn_r4,all_linear_r2')

sweep rank_packed hydra/launcher=packed $ranks
sweep rank_sequential $ranks
cp -r "$out/rank_packed" "$out/rank_packed_again"
sweep rank_packed_again hydra/launcher=packed $ranks
sweep rank_packed_seeds hydra/launcher=packed $ranks seed=1,2
sweep budget_packed_seeds hydra/launcher=packed "${budget[@]}" seed=42,1,2
$py -m lora_vision.report "$out/rank_packed" "$out/rank_packed_seeds" "$out/budget_packed_seeds" --out "$here" \
  --title "A pretrained ViT-Ti on Imagewoof: q,v rank sweep and equal-budget targets over seeds 42, 1, 2 (packed)"
$py "$here/compare.py" "$out" experiments/imagewoof_vit_tiny_cpu/report.csv > "$here/results.md"
