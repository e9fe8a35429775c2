#!/usr/bin/env bash
# Train the tiny NExT-Chat of examples/tiny-nextchat-shapes FROM SCRATCH on the synthetic shapes task, on CPU,
# with the project's Trainer path, then evaluate it on seeds never used for training.
#
#   bash examples/train_shapes.sh            # outputs under ./runs (override with RUNS=/some/dir)
#   VISION_STEPS=50 PHASE1_STEPS=20 PHASE2_STEPS=10 bash examples/train_shapes.sh   # a quick check of the whole path
#   Other variables: NPROC (processes per stage, default 2), PYTHON (the interpreter, default python).
#
# Data: a warm-up section of lone objects (5k "where is X" samples: where before which), then 40k scenes of 2-3
# objects (a fifth of them alone), one turn of one of the four tasks each, grounded captions listing their objects
# by name (colour, then shape); written by two processes in parallel.
# Stage 0 (2000 steps): the vision tower alone learns to name the object under every patch (colour x shape)
# and to regress that object's box, from the generator's masks: a stand-in for CLIP pretraining (see
# nextchat/training/vision_pretrain.py).
# Phase 1 (stage "stage2", 1300 steps of 2 x 32, starting from that tower): projector, LLaMA and the box
# heads with CLIP frozen, as in the original's stages 1-2, reading the data in file order
# (train_sampling_strategy "sequential"), so the warm-up comes first; plus two training-only attention terms (not in
# the original): each of heads 0-2 of every answer trigger is asked to attend to its object's patches, which a
# from-scratch model otherwise learns last, and head 3 of every region-caption token to the given box's patches
# (`attention_supervision` in training/configs/shapes_tiny.json), with model seed 4 for the LLaMA, the heads and SAM (stage 0 keeps the
# config's seed 0 for the tower).
# Phase 2 (stage "sam", 600 steps of 2 x 16): seg_prompt_mlp and SAM with everything else frozen — the
# original's mask stage 3, except that all of SAM trains because it is not pretrained here, and that SAM is
# prompted with the ground-truth box in training (`sam_box_prompt` "target"; generation uses the predicted one).
# Every stage runs as NPROC data-parallel CPU processes (torchrun, gloo, one thread each) for a fixed number of
# steps, with the learning rate decaying over those steps: on one machine a run is the same run every time (with
# NPROC=2), whatever the machine's speed. The whole script takes about 15 minutes on a 2-core CPU.
# The final model is $RUNS/shapes_tiny/final, its scores $RUNS/shapes_tiny/final_metrics.json. The runs that chose
# this recipe (seeds, caption order, variants) are in docs/experiments.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-$ROOT/runs}
PY=${PYTHON:-python}
NPROC=${NPROC:-2}
DATA=$RUNS/shapes_data
start=$(date +%s)
$PY -m nextchat.training.synthetic "$DATA/warmup" --num 5000 --seed-start 2000000 --tasks rec,res \
    --min-objects 1 --max-objects 1 --max-turns 1 &
$PY -m nextchat.training.synthetic "$DATA/train" --num 40000 --seed-start 0 --single-object-fraction 0.2 --max-turns 1 \
    --caption-order name &
wait
$PY -m torch.distributed.run --nproc_per_node "$NPROC" -m nextchat.training.vision_pretrain \
    "$ROOT/training/configs/shapes_tiny.json" "$RUNS/shapes_tiny/vision_tower" --max-steps "${VISION_STEPS:-2000}" \
    --box-loss-weight 1
$PY -m torch.distributed.run --nproc_per_node "$NPROC" -m nextchat.training.train \
    "$ROOT/training/configs/shapes_tiny.json" \
    --set model.vision_tower_init="\"$RUNS/shapes_tiny/vision_tower\"" \
    --set data.synthetic=null --set training_args.max_steps="${PHASE1_STEPS:-1300}" --set model.seed=4 \
    --set data.train="[\"$DATA/warmup/data.jsonl\", \"$DATA/train/data.jsonl\"]" \
    --set training_args.output_dir="\"$RUNS/shapes_tiny/phase1\"" \
    --set output_model_dir="\"$RUNS/shapes_tiny/phase1/final\""
$PY -m torch.distributed.run --nproc_per_node "$NPROC" -m nextchat.training.train \
    "$ROOT/training/configs/shapes_tiny_masks.json" \
    --set model.pretrained="\"$RUNS/shapes_tiny/phase1/final\"" \
    --set data.train="\"$DATA/train/data.jsonl\"" --set training_args.max_steps="${PHASE2_STEPS:-600}" \
    --set training_args.output_dir="\"$RUNS/shapes_tiny/phase2\"" \
    --set output_model_dir="\"$RUNS/shapes_tiny/final\""
end=$(date +%s)
echo "[train_shapes] total wall clock (data + both phases): $((end - start)) s"
$PY -m nextchat.training.synthetic_eval "$RUNS/shapes_tiny/final" --num 300 --output "$RUNS/shapes_tiny/final_metrics.json"
