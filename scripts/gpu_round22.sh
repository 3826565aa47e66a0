#!/usr/bin/env bash
# GPU round 22 in one call of the lent machine, from what the repository holds (docs/training.md,
# "Round 23"). Earlier plans started from local runs that did not outlive their checkout; this one
# rebuilds its start on the GPU:
#
#   1. the shipped model's vision tower taught colour and shape by the bench, pulled towards its
#      own outputs (--keep 10) so the language model still reads it (about 2 minutes);
#   2. two trainings side by side from that tower (frozen), 7 loader workers each (as rounds 18
#      and 19), the shape form in the mix (config/train_tiny_gpu_round22.yaml):
#      r22  box-first answers, the shipped model's own format;
#      r22e label-echo answers ("mug" written before its box): the only format in which a shape
#           lookup has appeared so far (rounds 21c/21d); round 23, box-first on the CPU, found none.
#   3. both exports, the tower bench's JSON and the logs copied to $OUT (tarballs: a call returns
#      few files).
#
# Run it through the device tool:  bash scripts/gpu_round22.sh   (timeout_s about 540: ~1.5 min of
# rendering and tower, 5 min of the two trainings, export)
# Then, here on the CPU: bench/attention_on_target.py and evaluate on val against round 19b.
# Ran on 2026-11-28 (H200, 8 min) with this checkout's transformers (5.24) carried as a wheel, as the
# device README says: pip download --no-deps transformers==5.24.0 -d .whl, carry [".whl"], and first
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
OUT=${OUT:-runs/gpu_round22_out}
mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1
TRAIN_S=${TRAIN_S:-240}
# For a smoke run on a CPU: DEVICE=cpu TOWER_STEPS=2 TOWER_SCENES=40 EXTRA="--stop-at-step 2 ..."
DEVICE=${DEVICE:-cuda}
TOWER_STEPS=${TOWER_STEPS:-2700}
TOWER_SCENES=${TOWER_SCENES:-12000}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"

# Fail in a second, not after the tower, when the machine's Python lacks what training imports
# (carry wheels as the device tool's README says, and put them on PYTHONPATH first).
python -c "import cv2, scipy, tqdm, yaml, safetensors, transformers" || {
    echo "gpu_round22: a package the training needs is missing here" >&2; exit 3; }

# A rerun on a warm machine starts afresh (the bench will not overwrite a model; train would resume).
rm -rf runs/tower_g22 runs/tiny_gpu_r22 runs/tiny_gpu_r22e

python bench/train_visual_attributes.py --model models/tiny_qwen3vl_seg --device "$DEVICE" \
    --steps "$TOWER_STEPS" --batch 32 --eval-every 900 --train-scenes "$TOWER_SCENES" --first-scene 7100000 \
    --workers 14 --keep 10 --save-model runs/tower_g22/model --out "$OUT/tower_g22.json" \
    2>&1 | tee "$OUT/tower_g22.log"

python -m qwen3vl_seg_ros.train config/train_tiny_gpu_round22.yaml --out runs/tiny_gpu_r22 \
    --train-time-s "$TRAIN_S" --time-budget-s $((TRAIN_S + 60)) --no-eval "${EXTRA_ARGS[@]}" > "$OUT/r22.log" 2>&1 &
python -m qwen3vl_seg_ros.train config/train_tiny_gpu_round22.yaml --out runs/tiny_gpu_r22e \
    --set data.answer_format=label_echo --set data.first_scene=9000000 --set run.seed=224 \
    --train-time-s "$TRAIN_S" --time-budget-s $((TRAIN_S + 60)) --no-eval "${EXTRA_ARGS[@]}" > "$OUT/r22e.log" 2>&1 &
status=0
for job in $(jobs -p); do wait "$job" || status=$?; done

for run in r22 r22e; do
    if [ -d "runs/tiny_gpu_$run/model" ]; then
        tar -C "runs/tiny_gpu_$run" -czf "$OUT/${run}_model.tgz" model
    fi
done
tail -n 3 "$OUT"/r22.log "$OUT"/r22e.log
exit "$status"
