#!/usr/bin/env bash
# Train the tiny NExT-Chat of examples/tiny-nextchat-shapes FROM SCRATCH on the synthetic shapes task, on CPU,
# with the project's Trainer path, then evaluate it on seeds never used for training.
#
#   bash examples/train_shapes.sh            # outputs under ./runs (override with RUNS=/some/dir)
#
# Phase 1 (stage "full" without SAM inputs): CLIP, projector, LLaMA and the box heads, 570 s of wall clock.
# Phase 2 (stage "sam"): seg_prompt_mlp and SAM with everything else frozen, 170 s — the original's recipe
# (stages 1-2, then the mask stage 3), except that SAM is trained too because it is not pretrained here.
# Both phases run as 2 data-parallel CPU processes (torchrun, gloo, one thread each); the learning-rate decay of
# each phase runs over its wall-clock budget, so a slower or shared machine trains fewer steps, not longer.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-$ROOT/runs}
PY=${PYTHON:-python}
NPROC=${NPROC:-2}
start=$(date +%s)
$PY -m nextchat.training.synthetic "$RUNS/shapes_data/train" --num 40000 --seed-start 0
$PY -m torch.distributed.run --nproc_per_node "$NPROC" -m nextchat.training.train \
    "$ROOT/training/configs/shapes_tiny.json" \
    --set data.synthetic.out_dir="\"$RUNS/shapes_data/train\"" \
    --set training_args.output_dir="\"$RUNS/shapes_tiny/phase1\"" \
    --set output_model_dir="\"$RUNS/shapes_tiny/phase1/final\""
$PY -m torch.distributed.run --nproc_per_node "$NPROC" -m nextchat.training.train \
    "$ROOT/training/configs/shapes_tiny_masks.json" \
    --set model.pretrained="\"$RUNS/shapes_tiny/phase1/final\"" \
    --set data.train="\"$RUNS/shapes_data/train/data.jsonl\"" \
    --set training_args.output_dir="\"$RUNS/shapes_tiny/phase2\"" \
    --set output_model_dir="\"$RUNS/shapes_tiny/final\""
end=$(date +%s)
echo "[train_shapes] total wall clock (data + both phases): $((end - start)) s"
$PY -m nextchat.training.synthetic_eval "$RUNS/shapes_tiny/final" --num 300 --output "$RUNS/shapes_tiny/final_metrics.json"
