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
was lost (requeue me, a bounded number of times), 1 error (a rerun fails the same way), 2 bad usage.
"""

import os
import sys
import traceback

from blip2_dist import dist
from blip2_dist.config import parse_config
from blip2_dist.errors import EXIT_ERROR, EXIT_PEER_LOST, UserError, hard_exit
from blip2_dist.train import NonFiniteLoss, train


def _rank() -> str:
    return os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"


def main(argv: list[str]) -> None:
    """Every way out goes through hard_exit: an exit report for the batch script, no hang at exit."""
    try:
        code = train(parse_config(argv, description=__doc__))
    except SystemExit as e:  # argparse: --help (0) or a bad command line (2)
        hard_exit(e.code if isinstance(e.code, int) else EXIT_ERROR)
    except (UserError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        hard_exit(EXIT_ERROR, str(e))
    except BaseException as e:  # noqa: BLE001 - the last line of defence of the process
        first_line = (str(e).splitlines() or [type(e).__name__])[0][:300]
        if dist.is_comm_failure(e):
            # A peer died or hung: this rank's own state is fine; the batch script requeues.
            message = f"a collective failed ({type(e).__name__}: {first_line}): another rank or its node is lost"
            print(f"error: rank {_rank()}: {message}; exiting with {EXIT_PEER_LOST}", file=sys.stderr, flush=True)
            hard_exit(EXIT_PEER_LOST, message)
        traceback.print_exc()
        print(f"error: rank {_rank()}: {type(e).__name__}: {first_line}", file=sys.stderr, flush=True)
        hard_exit(EXIT_ERROR, f"{type(e).__name__}: {first_line}")
    hard_exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
