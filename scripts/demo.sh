#!/usr/bin/env bash
# The whole pipeline on the tiny random-weight model set, on CPU, in a few minutes:
# tiny weights -> toy dataset -> latent cache -> text cache -> LoRA training (accelerate) -> video with the LoRA.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]   (default demo_output; run scripts/install.sh first)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_output}
PY=.venv/bin/python
W=$OUT/weights
step() { printf '\n==> %s\n' "$*"; }

step "tiny model set in the real formats -> $W"
$PY -m kandinsky5.tiny_weights --output_dir "$W"

step "toy dataset (images + clips + captions) -> $OUT/data"
$PY scripts/make_toy_dataset.py --output_dir "$OUT/data"

step "cache latents"
$PY kandinsky5_cache_latents.py \
    --dataset_config "$OUT/data/dataset.toml" \
    --vae "$W/vae/diffusion_pytorch_model.safetensors" \
    --skip_existing

step "cache text encoder outputs"
$PY kandinsky5_cache_text_encoder_outputs.py \
    --dataset_config "$OUT/data/dataset.toml" \
    --task k5-tiny-t2v \
    --text_encoder_qwen "$W/text_encoder" \
    --text_encoder_clip "$W/text_encoder2" \
    --batch_size 4 \
    --skip_existing

step "train a LoRA (accelerate launch)"
.venv/bin/accelerate launch --num_cpu_threads_per_process 1 --num_processes 1 --num_machines 1 \
    --mixed_precision bf16 --dynamo_backend no \
    kandinsky5_train_network.py \
    --mixed_precision bf16 \
    --dataset_config "$OUT/data/dataset.toml" \
    --task k5-tiny-t2v \
    --dit "$W/model/k5_tiny_t2v.safetensors" \
    --text_encoder_qwen "$W/text_encoder" \
    --text_encoder_clip "$W/text_encoder2" \
    --vae "$W/vae/diffusion_pytorch_model.safetensors" \
    --sdpa \
    --gradient_checkpointing \
    --learning_rate 1e-3 \
    --optimizer_type AdamW \
    --lr_scheduler constant_with_warmup \
    --lr_warmup_steps 2 \
    --network_module networks.lora_kandinsky \
    --network_dim 8 \
    --network_alpha 8 \
    --timestep_sampling shift \
    --discrete_flow_shift 5.0 \
    --output_dir "$OUT/lora" \
    --output_name demo_lora \
    --save_every_n_epochs 2 \
    --max_train_epochs 4 \
    --seed 42 \
    --overwrite

step "generate a video with the LoRA"
$PY kandinsky5_generate_video.py \
    --task k5-tiny-t2v \
    --dit "$W/model/k5_tiny_t2v.safetensors" \
    --vae "$W/vae/diffusion_pytorch_model.safetensors" \
    --text_encoder_qwen "$W/text_encoder" \
    --text_encoder_clip "$W/text_encoder2" \
    --prompt "a red square slides from left to right, toy style" \
    --frames 9 --steps 8 --guidance 5 --seed 42 \
    --width 128 --height 128 \
    --lora_weight "$OUT/lora/demo_lora.safetensors" \
    --lora_multiplier 1.0 \
    --output "$OUT/demo.mp4" --overwrite

printf '\nDone. Video: %s\n' "$OUT/demo.mp4"
