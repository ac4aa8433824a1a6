#!/usr/bin/env bash
# Time the packer on a Flickr8k-sized fake tree: 8,000 photo-like JPEGs (~500x375, ~120 KB each,
# 6000/1000/1000 in the official split files), packed as-is and with --max-side 364.
#
#   bash benchmarks/bench_pack.sh                 # tree in /tmp/flickr8k_fake, shards in /tmp/flickr8k_shards
#   WORKERS=4 bash benchmarks/bench_pack.sh TREE OUT
#
# The tree (blip2_dist.data.synthetic.write_photo_flickr8k) is written once (minutes; never in the repo)
# and reused. Timings are with a warm page
# cache (the tree was just written or packed before); the pack prints images/s per run, `time`
# the CPU seconds (user+sys), which tell the cost when other work shares the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TREE=${1:-/tmp/flickr8k_fake}
OUT=${2:-/tmp/flickr8k_shards}
WORKERS=${WORKERS:-2}
export OMP_NUM_THREADS=1

if [ ! -f "$TREE/Flickr8k_text/Flickr8k.token.txt" ]; then
    "$PY" - "$TREE" "$WORKERS" <<'PY'
import sys
from blip2_dist.data.synthetic import write_photo_flickr8k
files = write_photo_flickr8k(sys.argv[1], n=8000, workers=int(sys.argv[2]))
total = sum(f.stat().st_size for f in files)
print(f"{sys.argv[1]}: {len(files)} images, {total / 2**20:.0f} MiB, mean {total / len(files) / 1024:.0f} KiB")
PY
fi
echo "machine: $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), load average $(cut -d' ' -f1-3 /proc/loadavg)"
cat "$TREE"/Flicker8k_Dataset/*.jpg > /dev/null   # warm the page cache

echo "== default: original bytes, every image fully decoded (--workers $WORKERS)"
time "$PY" -m blip2_dist.data.pack_cli flickr8k "$TREE" --out "$OUT/default" --workers "$WORKERS" --no-progress
echo "== --max-side 364 (BLIP-2's image size; --workers $WORKERS)"
time "$PY" -m blip2_dist.data.pack_cli flickr8k "$TREE" --out "$OUT/max364" --workers "$WORKERS" --max-side 364 --no-progress
du -sh "$OUT/default" "$OUT/max364"
