"""Process-group start-up on CPU leaves nothing behind in /dev/shm."""

import subprocess
from pathlib import Path

from launch_helpers import BIN, cpu_env, explain, free_port

SCRIPT = """
import torch
from blip2_dist import dist
dist.init_distributed()
t = torch.ones(1)
torch.distributed.all_reduce(t)
assert t.item() == 2.0
print("sum ok", flush=True)
# Ends the way every entry point of the project ends (errors.run_main -> hard_exit): an ordinary
# interpreter exit with the process group alive sometimes aborts in a C++ thread's destructor
# ("terminate called without an active exception", exit -6), which is not what this test is about.
from blip2_dist.errors import hard_exit
hard_exit(0)
"""


def test_two_cpu_ranks_leave_no_shared_memory_segment(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(SCRIPT)
    port = free_port()
    segments = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not segments  # a fresh port: nothing there before
    proc = subprocess.run(
        [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(script)],
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.count("sum ok") == 2, explain(proc)
    # DeepSpeed's CPU backend creates one ~66 MB segment per rank; without unlinking they stay.
    assert not sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
