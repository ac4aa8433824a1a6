#!/usr/bin/env bash
# The end-to-end demo on a CPU machine (what `make demo` runs): synthetic shards -> evaluate the
# untrained tiny BLIP-2 -> train it with DeepSpeed ZeRO-2 on 2 CPU ranks (bf16) -> evaluate again
# -> caption a few images -> export a merged model -> a summary table. Everything lands in runs/demo;
# about 5 minutes on 2 cores. TensorBoard: runs/demo/tensorboard holds two runs, "before-training" and
# "training"; runs/demo/gallery.html shows every evaluation's captions side by side.
# The tiny model is random, and a random Q-Former passes almost nothing of the image on, so the
# demo trains the Q-Former fully and puts LoRA on the vision encoder too (--train-qformer,
# --vision-lora-targets); on real BLIP-2 checkpoints LoRA on the language model is the default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
DATA=${DATA:-shards/synthetic}
RUN=${RUN:-runs/demo}
MODEL=${MODEL:-tiny-t5}
STEPS=${STEPS:-1000}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
GEN="--num-beams 3 --max-new-tokens 16 --min-length 1"
start=$(date +%s)

echo "== 1/6 synthetic shards -> $DATA"
[ -f "$DATA/manifest.json" ] || $PY -m blip2_dist.data.pack_cli synthetic --out "$DATA"
$PY -c "import sys; from blip2_dist.data.shards import read_manifest; from blip2_dist.data.pack import summarize_manifest; print(summarize_manifest(read_manifest(sys.argv[1])))" "$DATA"

rm -rf "$RUN"
echo "== 2/6 evaluate the untrained $MODEL (2 ranks)"
$DS --num_gpus 2 launch/evaluate.py --model "$MODEL" --data "$DATA" --split val \
    --output-dir "$RUN/before" --tensorboard-dir "$RUN/tensorboard/before-training" $GEN 2>&1 \
    | grep -E "^eval|error|Error" || true

echo "== 3/6 train: DeepSpeed ZeRO-2, bf16, 2 CPU ranks, $STEPS steps"
$DS --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json --model "$MODEL" --data "$DATA" \
    --output-dir "$RUN" --max-steps "$STEPS" --micro-batch 16 --lr 3e-3 --warmup-steps 30 \
    --lora-r 16 --train-qformer --vision-lora-targets qkv --save-steps 500 --eval-steps 500 \
    --log-steps 20 --num-workers 1 $GEN

echo "== 4/6 caption a few test images with the best adapter (its prompt and generation settings)"
mkdir -p "$RUN/samples"
$PY - "$DATA" "$RUN/samples" <<'PYEOF'
import io, sys, tarfile
from pathlib import Path
tar = tarfile.open(sorted(Path(sys.argv[1]).glob("test-*.tar"))[0])
for m in [m for m in tar if m.name.endswith(".jpg")][:4]:
    (Path(sys.argv[2]) / m.name).write_bytes(tar.extractfile(m).read())
PYEOF
$PY launch/caption.py --adapter "$RUN/best" "$RUN/samples"

echo "== 5/6 export the best adapter merged into its base (plain transformers loads it)"
$PY launch/export.py --adapter "$RUN/best" --out "$RUN/merged" --dtype float32

echo "== 6/6 summary"
$PY - "$RUN" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from blip2_dist.data.synthetic import attribute_accuracy
run, secs = Path(sys.argv[1]), int(sys.argv[2])
load = lambda p: json.loads((run / p).read_text())
before, best, final = load("before/results.json")["metrics"], load("best/metrics.json"), load("final_state.json")
acc_before = attribute_accuracy(load("before/predictions.json"))
acc_after = attribute_accuracy(load(f"eval/{best['step']:08d}/predictions.json"))
tb = EventAccumulator(str(run / "tensorboard" / "training")); tb.Reload()
speed = [e.value for e in tb.Scalars("perf/captions_per_s")][1:] or [float("nan")]
print(f"{'metric (val)':<22}{'before':>9}{'after':>9}")
for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
    print(f"{k:<22}{before.get(k, float('nan')):>9.3f}{best.get(k, float('nan')):>9.3f}")
for k, label in (("colour", "right colour"), ("shape", "right shape"), ("count", "right count"), ("all", "all of it right")):
    print(f"{label:<22}{acc_before[k]:>8.0%} {acc_after[k]:>8.0%}")
losses = final["loss_history"]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {final['step']} steps (best at step {best['step']})")
print(f"training speed {sum(speed) / len(speed):.0f} captions/s on 2 CPU ranks (ZeRO-2, bf16)")
print(f"run folder {run}/  (checkpoints/, best/, merged/, eval/*/gallery.html, config.json)")
print(f"captions of every evaluation side by side: {run}/gallery.html")
print(f"TensorBoard: .venv/bin/tensorboard --logdir {run}/tensorboard   (runs before-training and training)")
print(f"demo took {secs // 60} min {secs % 60} s")
PYEOF
