"""The performance benchmark: our LoRA against its floor and against Hugging Face PEFT.

`python -m lora_vision.bench` (or `make bench`) times a training step of each configuration for three sides in
one process, in rotating order: ours, PEFT's LoRA on the same timm model and targets, and the floor (the same
model, all weights frozen, gradients flowing through the activations down to the adapted layers). It also
measures peak memory per side in a fresh child process, and inference of the base, merged and unmerged models.
See `experiments/benchmarks/README.md` for how to read the output.
"""
