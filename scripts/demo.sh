#!/usr/bin/env bash
# The whole pipeline on the tiny random-weight model set, on CPU, in a few minutes:
# tiny weights -> toy dataset -> latent cache -> text cache -> LoRA training (accelerate) -> video with the LoRA.
# Training holds out part of the data (--validation_split) and measures the validation loss before and after, samples
# two prompts into contact sheets, and draws loss.png; the end of the output says where to look.
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

step "train a LoRA (accelerate launch), with a validation split and samples"
cat > "$OUT/prompts.txt" <<'PROMPTS'
a red square slides from left to right, toy style --w 64 --h 64 --f 9 --s 4 --g 1 --d 7
a green circle on a dark background, toy style --w 64 --h 64 --f 1 --s 4 --g 1 --d 42
PROMPTS
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
    --max_train_epochs 8 \
    --validation_split 0.25 \
    --validate_every_n_epochs 2 \
    --sample_prompts "$OUT/prompts.txt" \
    --sample_at_first \
    --sample_every_n_epochs 8 \
    --seed 42 \
    --overwrite 2>&1 | tee "$OUT/train.log"

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

RUN=$(ls -d "$OUT"/lora/logs/demo_lora_* | tail -n 1)
printf '\nDone. What to look at:\n'
$PY - "$RUN" "$OUT" <<'SUMMARY'
import json, sys
from pathlib import Path

run, out = Path(sys.argv[1]), Path(sys.argv[2])
v = json.loads((run / "history.json").read_text())["validation"]
print(f"  validation loss {v[0]['mean']:.3f} → {v[-1]['mean']:.3f} (held-out data, step {v[0]['step']} → {v[-1]['step']}: "
      f"{'the LoRA learned' if v[-1]['mean'] < v[0]['mean'] else 'no improvement'})")
sheets = sorted((out / "lora" / "sample").glob("*_sheet.png"))
print(f"  contact sheets  {sheets[0]} (before) and {sheets[-1]} (after)")
print(f"  loss curve      {run / 'loss.png'}")
print(f"  TensorBoard     tensorboard --logdir {run.parent}")
print(f"  video           {out / 'demo.mp4'} (random tiny weights: noise by design)")
SUMMARY
