"""Fine-tune BLIP-2 with LoRA on a DeepSpeed engine.

GPU box (all local GPUs):
    deepspeed launch/train.py --deepspeed ds_configs/zero2.json \
        --model Salesforce/blip2-flan-t5-xl --data shards/flickr8k --output-dir runs/ft5xl
torchrun:  torchrun --nproc_per_node 8 launch/train.py ...      SLURM: sbatch launch/slurm/train.sbatch
CPU, 2 ranks, tiny model (what the demo runs):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/train.py \
        --model tiny-t5 --data shards/synthetic --output-dir runs/demo --max-steps 200
Resume after a crash or preemption: add --resume auto. Every flag: --help.
Exit codes: 0 finished, 75 saved after SIGTERM/SIGUSR1 (requeue me), 76 another rank or its node
was lost (requeue me, a bounded number of times), 1 error (a rerun fails the same way: one line on
stderr, a traceback too for an unexpected one; --debug for all), 2 bad usage, 130 Ctrl-C.
Every exit goes through errors.hard_exit (an exit report for the batch script, no hang at exit).
"""

from blip2_dist.config import parse_config
from blip2_dist.errors import run_main


def main(argv: list[str]) -> int:
    cfg = parse_config(argv, description=__doc__)
    from blip2_dist.train import train  # after the flags are parsed: --help and typos answer at once

    return train(cfg)


if __name__ == "__main__":
    run_main(main)
