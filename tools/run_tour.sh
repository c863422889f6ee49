#!/usr/bin/env bash
# README's tour, command for command, on the bundled toy base: every output lands under output/tour (ignored),
# nothing overwrites another step's result. Usage: bash tools/run_tour.sh [--quick]  (--quick: 20 training steps)
set -euo pipefail
cd "$(dirname "$0")/.."
T=output/tour
STEPS=()
if [[ "${1:-}" == "--quick" ]]; then STEPS=(max_steps=20); fi
t0=$SECONDS
python train_blockwise.py --config train_configs/toy_frog.yaml output_dir=$T/frog "${STEPS[@]}"
python train_blockwise.py --config train_configs/toy_ink.yaml output_dir=$T/ink "${STEPS[@]}"
lorakit inspect $T/frog/toy_frog.safetensors --base data/toy-base
python train_edlora.py --config train_configs/toy_edlora_character.yaml output_dir=$T/edlora max_steps=20
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_blockwise.py --config train_configs/toy_frog.yaml \
    output_dir=$T/frog_2proc train_batch_size=4 max_steps=20
echo "== train: $((SECONDS - t0)) s"; t0=$SECONDS
lorakit fuse --method gradient --base data/toy-base --template "{}, white plain background" \
    --adapters $T/frog/toy_frog.safetensors $T/ink/toy_ink.safetensors --out $T/fused_frog_ink
lorakit fuse --method weighted --adapters $T/frog/toy_frog.safetensors $T/ink/toy_ink.safetensors \
    --weights 0.8 0.8 --out $T/frog_ink_avg.safetensors
echo "== fuse: $((SECONDS - t0)) s"; t0=$SECONDS
lorakit sample --base data/toy-base --method cmlora --prompt "kwibbit, white plain background, inkvel" \
    --adapters $T/frog/toy_frog.safetensors $T/ink/toy_ink.safetensors --weights 0.8 0.8 \
    --steps 20 --cfg 4 --num-images 8 --out $T/samples/cmlora
echo "== sample: $((SECONDS - t0)) s"; t0=$SECONDS
lorakit eval --metric oracle --images $T/samples/cmlora
lorakit eval --metric retention --base data/toy-base --fused $T/fused_frog_ink \
    --adapters $T/frog/toy_frog.safetensors $T/ink/toy_ink.safetensors --out $T/eval_retention
echo "== eval: $((SECONDS - t0)) s"
