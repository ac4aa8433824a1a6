"""Rank and world from the environment, process-group start-up, and small collective helpers.

Rank/world are read once from the variables the launchers set: `deepspeed` and `torchrun` set
RANK/WORLD_SIZE/LOCAL_RANK; under `srun` only SLURM_* exist, so those are the fallback (the same
idea as open_clip's `world_info_from_env`). Nothing here runs at import.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world_info_from_env() -> WorldInfo:
    """RANK/WORLD_SIZE/LOCAL_RANK (deepspeed, torchrun), else SLURM_PROCID/NTASKS/LOCALID (srun)."""
    return WorldInfo(
        rank=_first_int("RANK", "SLURM_PROCID", default=0),
        local_rank=_first_int("LOCAL_RANK", "SLURM_LOCALID", default=0),
        world_size=_first_int("WORLD_SIZE", "SLURM_NTASKS", default=1),
    )


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    hosts = out.stdout.split()
    return hosts[0] if out.returncode == 0 and hosts else "127.0.0.1"


def export_env_for_torch(info: WorldInfo) -> None:
    """Under plain `srun`, torch.distributed's env:// init needs RANK etc.: derive them from SLURM."""
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr() if "SLURM_PROCID" in os.environ else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        if "SLURM_JOB_ID" in os.environ:
            # Every task must name the same port without talking to the others: derived from the job
            # id, so two jobs sharing a node do not collide.
            os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)
        elif info.world_size == 1:  # `python launch/train.py`: any free port, so two such runs share a host
            os.environ["MASTER_PORT"] = str(free_port())
        else:  # ranks started by hand with RANK/WORLD_SIZE: they must agree, so torch's usual default
            os.environ["MASTER_PORT"] = "29500"


def rank_placement() -> dict:
    """Where this rank runs and what it may use: host name, CPUs in its affinity mask (what Slurm's
    --cpus-per-task gave it, when the cluster binds tasks), torch's intra-op threads."""
    return {
        "rank": get_rank(),
        "host": socket.gethostname(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "slurm_cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"),
    }


def free_port() -> int:
    """A TCP port free on this host now, for a launcher's MASTER_PORT (a fixed default such as the
    deepspeed launcher's 29500 collides with any other job on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(info: WorldInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


# Long enough for the slowest legitimate wait inside a collective (a 3B model loading from a
# network filesystem on one node while the others wait in DeepSpeed's first broadcast; rank 0
# scoring a 5,000-image evaluation while the others wait for the metrics), short enough that a
# stuck-but-alive peer, which the heartbeat watchdog cannot see, costs minutes and not hours.
DEFAULT_DIST_TIMEOUT_S = 600


def init_distributed(timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> WorldInfo:
    """Bind this rank's device, then start the process group through DeepSpeed (nccl on GPU, gloo on
    CPU). Safe with world 1.

    `timeout_s` bounds every collective: past it, gloo raises in the waiting rank, and NCCL's
    watchdog tears the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING, see docs/slurm.md)."""
    import datetime

    import deepspeed

    info = world_info_from_env()
    export_env_for_torch(info)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Bind this rank's GPU before the first collective: NCCL otherwise sets up every rank's communicator
    # on device 0 (a hang, or all ranks' work on one GPU).
    device_for(info)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            verbose=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        if backend == "gloo":
            _unlink_cpu_shm_segment()
    return info


def _unlink_cpu_shm_segment() -> None:
    """Remove the name of this rank's DeepSpeed CPU shared-memory segment once every rank has mapped
    it. DeepSpeed's CPU backend creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (~66 MB) when all ranks share a host and never unlinks it: every run, finished or killed, would
    leave RAM-backed files behind until the machine runs out of memory. The mappings outlive the name."""
    if os.environ.get("LOCAL_SIZE") != str(get_world_size()):  # DeepSpeed's own test: all ranks local
        return
    barrier()  # every rank has opened every other rank's segment by name before any name goes
    path = Path("/dev/shm") / (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{get_rank()}"
    )
    path.unlink(missing_ok=True)


def store_address() -> tuple[str, int]:
    """Host and port of the job's TCPStore (the process group's rendezvous): what every launcher
    we support (deepspeed, torchrun, srun via export_env_for_torch) puts in MASTER_ADDR/PORT."""
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def is_comm_failure(exc: BaseException) -> bool:
    """Did `exc` come out of a collective or the store (a lost peer, a timeout), rather than from
    our own code? gloo raises plain RuntimeErrors ("Connection closed by peer", "Timed out waiting
    ... for recv"), so besides torch's Dist* errors the traceback is checked for torch.distributed."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    if not isinstance(exc, RuntimeError):  # a TypeError/ValueError in a collective is a misuse: a bug
        return False
    tb = exc.__traceback__
    while tb is not None:
        if f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def print0(*args: Any, **kwargs: Any) -> None:
    """Print on rank 0 only; before the process group starts, the rank comes from the environment."""
    if (get_rank() if is_initialized() else world_info_from_env().rank) == 0:
        print(*args, flush=True, **kwargs)


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (a one-element list without a group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def _collective_device() -> torch.device:
    # nccl only reduces CUDA tensors; gloo only CPU ones.
    if is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_scalar(value: float, op) -> float:
    if not is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_max(value: float) -> float:
    return _all_reduce_scalar(value, torch.distributed.ReduceOp.MAX)


def all_reduce_max_many(values: list[float]) -> list[float]:
    """Element-wise max over ranks of a short list (flags), in one collective."""
    if not is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(value: float) -> float:
    return _all_reduce_scalar(value, torch.distributed.ReduceOp.SUM) / get_world_size()
