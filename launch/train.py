"""Fine-tune BLIP-2 with LoRA on a DeepSpeed engine.

GPU box (all local GPUs):
    deepspeed launch/train.py --deepspeed ds_configs/zero2.json \
        --model Salesforce/blip2-flan-t5-xl --data shards/flickr8k --output-dir runs/ft5xl
torchrun:  torchrun --nproc_per_node 8 launch/train.py ...      SLURM: sbatch launch/slurm/train.sbatch
CPU, 2 ranks, tiny model (what the demo runs):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/train.py \
        --model tiny-t5 --data shards/synthetic --output-dir runs/demo --max-steps 200
Resume after a crash or preemption: add --resume auto. Every flag: --help.
Exit codes: 0 finished, 75 saved after SIGTERM/SIGUSR1 (requeue me), 1 error.
"""

import sys

from blip2_dist.config import parse_config
from blip2_dist.train import NonFiniteLoss, train

if __name__ == "__main__":
    cfg = parse_config(sys.argv[1:], description=__doc__)
    try:
        sys.exit(train(cfg))
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
