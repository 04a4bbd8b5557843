#!/usr/bin/env bash
# The study's exact commands: a pretrained ViT-Ti on Imagewoof (conf/exp/imagewoof_vit_tiny.yaml: 112 px, a 1,000-image
# class-balanced training subset, 3 epochs): a learning-rate search per method family on the validation split, then
# linear probe, BitFit, LoRA q,v at ranks 1-32, six other target sets at rank 8, DoRA, PiSSA, rsLoRA and full
# fine-tuning; the main points again at 224 px; the report; spectra and truncation of the best q,v adapter; the best
# q,v run exported to a plain timm checkpoint and evaluated in a fresh process.
# Usage: experiments/imagewoof_vit_tiny_cpu/run.sh DIR_WITH_OFFLINE_ASSETS [OUT]
#   DIR_WITH_OFFLINE_ASSETS holds data/imagewoof/imagewoof2-160.tar and
#   weights/vit_tiny_patch16_224.tinyimagenet_ft.safetensors.
source experiments/common.sh "$1"
out=${2:-outputs/study_imagewoof_vit_tiny}
train() {
  offline_multirun +exp=imagewoof_vit_tiny model.checkpoint="$vit_tiny_weights" \
    data.archive="$imagewoof_archive" "$@"
}

# 1. Learning rate per method family, chosen on the validation split alone (test=false: no test score exists yet).
search=$out/lr_search
train optim.lr=1e-3,3e-3,1e-2 test=false hydra.sweep.dir="$search/lora"
train lora=linear_probe perf.cache_prefix=true optim.lr=3e-4,1e-3,3e-3,1e-2,3e-2 test=false \
  hydra.sweep.dir="$search/linear_probe"
train lora=bitfit optim.lr=3e-4,1e-3,3e-3,1e-2 test=false hydra.sweep.dir="$search/bitfit"
train lora=full optim.lr=3e-5,1e-4,3e-4,1e-3 test=false hydra.sweep.dir="$search/full"
$py -m lora_vision.report "$search" --out "$here/lr_search" \
  --title "Learning-rate search on the validation split (ViT-Ti, Imagewoof, 112 px)"
lora_lr=$($py $here/best.py lr "$search/lora")
probe_lr=$($py $here/best.py lr "$search/linear_probe")
bitfit_lr=$($py $here/best.py lr "$search/bitfit")
full_lr=$($py $here/best.py lr "$search/full")
echo "chosen learning rates: lora $lora_lr, linear probe $probe_lr, bitfit $bitfit_lr, full $full_lr"

# 2. The grid at 112 px. Seeds 42, 1, 2 where the report needs error bars; the seed also draws the training subset
# and the validation split.
grid=$out/grid
probe=(lora=linear_probe perf.cache_prefix=true optim.lr="$probe_lr")
train "${probe[@]}" seed=42,1,2 hydra.sweep.dir="$grid/linear_probe"
train lora=bitfit optim.lr="$bitfit_lr" hydra.sweep.dir="$grid/bitfit"
train optim.lr="$lora_lr" lora.rank=1,2,4,8,16,32 hydra.sweep.dir="$grid/lora_qv"
train optim.lr="$lora_lr" seed=1,2 hydra.sweep.dir="$grid/lora_qv_r8_seeds"
train optim.lr="$lora_lr" 'lora.targets=[qkv],[qkv_fused],[attn],[mlp],[all_linear]' hydra.sweep.dir="$grid/lora_targets"
train optim.lr="$lora_lr" lora.blocks=-4: perf.cache_prefix=true hydra.sweep.dir="$grid/lora_qv_last4"
# The budget of q,v at r=8 (6,144 adapter parameters per block) spent elsewhere, as in Hu et al. 2021, Table 5:
# q,k,v,o at r=4 and every Linear at r=2 (the whole fused qkv at r=8 is in the targets sweep above).
train optim.lr="$lora_lr" lora.rank=4 'lora.targets=[attn]' hydra.sweep.dir="$grid/budget_attn_r4"
train optim.lr="$lora_lr" lora.rank=2 'lora.targets=[all_linear]' hydra.sweep.dir="$grid/budget_all_linear_r2"
train optim.lr="$lora_lr" lora=dora,pissa,rslora hydra.sweep.dir="$grid/lora_variants"
train lora=full optim.lr="$full_lr" seed=42,1,2 hydra.sweep.dir="$grid/full"

# 3. The main points at the backbone's own 224 px (the learning rates of the 112 px search).
grid224=$out/grid_224
train data.image_size=224 "${probe[@]}" hydra.sweep.dir="$grid224/linear_probe"
train data.image_size=224 optim.lr="$lora_lr" hydra.sweep.dir="$grid224/lora_qv"
train data.image_size=224 lora=full optim.lr="$full_lr" hydra.sweep.dir="$grid224/full"

# The committed report.md and report.png, here and in lr_search/, were later redrawn from the committed
# report.csv (python -m lora_vision.report --from-csv); README.md gives the commands.
$py -m lora_vision.report "$grid" "$grid224" --out "$here" \
  --title "A pretrained ViT-Ti on Imagewoof (1k train images, 3 epochs, CPU)"

# 4. The best q,v adapter of the rank sweep (by validation accuracy): spectra and post-hoc truncation on the
# validation split, then export to a plain timm checkpoint and evaluation on the test split in a fresh process.
best=$($py $here/best.py run "$grid/lora_qv")
$py -m lora_vision.analyze "$best" --split val --out "$here/analysis_best_qv"
$py -m lora_vision.export "$best" --out "$out/export_best_qv"
HF_HUB_OFFLINE=1 $py -m lora_vision.evaluate "$out/export_best_qv" \
  data.archive="$imagewoof_archive" | tee "$here/export_check.txt"
$py - "$out/export_best_qv/eval/imagewoof_test.json" "$best/results.json" <<'EOF' | tee -a "$here/export_check.txt"
import json, sys
exported, run = (json.load(open(path)) for path in sys.argv[1:])
print(f"exported model, fresh process: acc1 {exported['acc1']!r}; the run's own test_acc1 {run['test_acc1']!r}")
EOF
