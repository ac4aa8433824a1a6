"""A real single-node Slurm (Debian slurm-wlm 22.05 + munge) started for the tests, then removed.

    with SlurmCluster() as cluster:                # installs the packages if they are missing
        job = cluster.submit("job.sh", args=["--ntasks=2"], env={"X": "1"}, cwd=repo)
        result = cluster.wait(job, timeout=60)     # JobResult(state="COMPLETED", exit_code=0, ...)

Everything lives in its own folder under BASE (`/tmp/blip2-dist-slurm/run-*`): slurm.conf, state
and spool dirs, logs, and a private munged (own key and socket, run as the munge user), on ports
picked free at start. Nothing in /etc is changed, so two sessions can each run a cluster, and a
system Slurm, if any, is left alone. Client commands find the cluster through SLURM_CONF, which
`env()` returns and `submit()` passes to the job (Slurm jobs inherit the submitting environment).

Teardown (also on errors): cancel this cluster's jobs, stop the daemons (TERM, then KILL), then end
any process still carrying this cluster's SLURM_CONF in its environment (job steps), by pid. A run
that crashed before its teardown leaves an `owner.json`; the next start cleans such folders whose
owner process is gone the same way. Why the slurm.conf looks as it does: PITFALLS.md, "A real
single-node Slurm on this machine".

Needs root (daemons, munge user) and apt for the first install; `SlurmUnavailable` is raised
otherwise, and the tests turn it into a skip with its reason. Any other failure is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

BASE = Path(os.environ.get("BLIP2_SLURM_BASE", "/tmp/blip2-dist-slurm"))
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NEEDED_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "munged")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# Terminal job states (a requeued job passes through REQUEUED/PENDING and is not done yet).
DONE_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "SPECIAL_EXIT",
}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be had on this machine (not root, no apt, install impossible): skip, not fail."""


@dataclass
class JobResult:
    job_id: int
    state: str           # JobState, e.g. COMPLETED, FAILED
    exit_code: int       # the batch script's exit code (from ExitCode=N:SIG)
    signal: int          # the signal that ended it, 0 if none
    restarts: int        # Restarts= (how often it was requeued)
    info: dict           # every field of `scontrol show job -o`


# ---- installation ------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_installed() -> None:
    """apt-get install the Slurm + munge packages unless already there (idempotent, ~15 s once)."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the Slurm tests need root (to install slurm and run its daemons)")
    if all(shutil.which(b) for b in NEEDED_BINARIES):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"slurm is not installed and there is no apt-get to install {PACKAGES}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
               "-o", "DPkg::Lock::Timeout=300", *PACKAGES]
    with _no_service_start():
        out = _run(install, timeout=900, env=env, stdin=subprocess.DEVNULL)
        if out.returncode != 0:  # stale or missing package lists: refresh once, try again
            _run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"],
                 timeout=900, env=env, stdin=subprocess.DEVNULL)
            out = _run(install, timeout=900, env=env, stdin=subprocess.DEVNULL)
    if out.returncode != 0 or not all(shutil.which(b) for b in NEEDED_BINARIES):
        tail = (out.stdout + out.stderr)[-1500:]
        raise SlurmUnavailable(f"could not install {' '.join(PACKAGES)} with apt-get:\n{tail}")


@contextlib.contextmanager
def _no_service_start():
    """A policy-rc.d that exits 101 keeps the packages' postinst from starting the daemons."""
    previous = POLICY_RC_D.read_bytes() if POLICY_RC_D.exists() else None
    if previous is not None and previous.strip().endswith(b"exit 101"):
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# written by tests/slurm_cluster.py during apt-get install\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        if previous is None:
            POLICY_RC_D.unlink(missing_ok=True)
        else:
            POLICY_RC_D.write_bytes(previous)


# ---- processes ---------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie counts as gone
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _pids_with_env(needle: str) -> list[int]:
    """Pids whose environment holds `needle` (e.g. "SLURM_CONF=/tmp/.../slurm.conf")."""
    key = needle.encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if key in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    return found


def _terminate(pids: list[int], grace: float = 10.0) -> None:
    """TERM these pids, KILL whichever is still there after `grace` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def clean_stale(base: Path = BASE) -> None:
    """Stop the daemons and job processes of clusters whose owning process died without teardown."""
    if not base.is_dir():
        return
    for run_dir in base.glob("run-*"):
        owner = run_dir / "owner.json"
        try:
            meta = json.loads(owner.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("owner_pid") and _alive(int(meta["owner_pid"])):
            continue  # another live session's cluster
        _terminate([p for p in meta.get("daemons", {}).values() if _alive(p)], grace=5)
        _terminate(_pids_with_env(f"SLURM_CONF={run_dir / 'slurm.conf'}"), grace=5)
        shutil.rmtree(run_dir, ignore_errors=True)


# ---- the cluster -------------------------------------------------------------------------------

class SlurmCluster:
    """One controller + one node (this machine), its own munged; a context manager."""

    def __init__(self, cred_expire: int = 10, start_timeout: float = 60.0, base: Path = BASE):
        # cred_expire: seconds a requeued job waits before it may start again (Slurm's minimum is 5,
        # default 120); also the life of a step credential, so not too short on a loaded machine.
        self.cred_expire = cred_expire
        self.start_timeout = start_timeout
        self.base = Path(base)
        self.root: Path | None = None
        self.conf: Path | None = None
        self.node_name = ""
        self._procs: dict[str, subprocess.Popen] = {}
        self._jobs: list[int] = []

    # -- life cycle

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        ensure_installed()
        clean_stale(self.base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # munged (as munge) must reach its socket below it
        self.root = self.base / f"run-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.root.mkdir(mode=0o755)
        self.conf = self.root / "slurm.conf"
        self._write_owner()
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node_name])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel jobs, stop daemons, end leftover job processes, remove the folder. Safe to repeat."""
        if self.root is None:
            return
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self._cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is None:
                _terminate([proc.pid], grace=10)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        _terminate(_pids_with_env(f"SLURM_CONF={self.conf}"), grace=5)
        self._procs.clear()
        if not os.environ.get("BLIP2_SLURM_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _cancel_all(self) -> None:
        if self._jobs:
            _run(["scancel", "--full", *map(str, self._jobs)], env=self.env(), timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = _run(["squeue", "-h", "-o", "%i"], env=self.env(), timeout=30)
            if out.returncode == 0 and not out.stdout.strip():
                return
            time.sleep(0.5)

    # -- set-up pieces

    def _write_owner(self) -> None:
        meta = {"owner_pid": os.getpid(), "daemons": {n: p.pid for n, p in self._procs.items()}}
        (self.root / "owner.json").write_text(json.dumps(meta))

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / f"{name}.out", "ab")
        # Marked with SLURM_CONF so stale-cleanup can find them and their children (slurmstepd).
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.root, start_new_session=True, **kw,
        )
        log.close()
        self._write_owner()

    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o755)
        shutil.chown(mdir, "munge", "munge")
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(key, "munge", "munge")
        self.munge_socket = mdir / "munge.socket"
        self._spawn("munged", [
            "munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}",
        ], user="munge", group="munge", extra_groups=[])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            enc = _run(["munge", "-n", "-S", str(self.munge_socket)], timeout=10)
            if enc.returncode == 0:
                dec = _run(["unmunge", "-S", str(self.munge_socket)], input=enc.stdout, timeout=10)
                if dec.returncode == 0:
                    return
            self._check_alive()
            time.sleep(0.1)
        raise RuntimeError(f"munged did not answer within 20 s\n{self.logs()}")

    def _write_conf(self) -> None:
        probe = _run(["slurmd", "-C"], timeout=30)
        node_line = next((l for l in probe.stdout.splitlines() if l.startswith("NodeName=")), None)
        if probe.returncode != 0 or node_line is None:
            raise RuntimeError(f"`slurmd -C` failed: {probe.stdout}{probe.stderr}")
        self.node_name = re.match(r"NodeName=(\S+)", node_line).group(1)
        ctld_port, slurmd_port = _free_ports(2)
        for sub in ("state", "spool", f"spool/slurmd-{self.node_name}", "log"):
            (self.root / sub).mkdir()
        r = self.root
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py: a one-node test cluster; see that file.
ClusterName=blip2test
SlurmctldHost={self.node_name}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Schedule often: a requeued job becomes eligible after cred_expire, then waits for a pass.
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=10
MinJobAge=600
{node_line.split(" UpTime=")[0]} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            out = _run(["sinfo", "-h", "-n", self.node_name, "-o", "%T"], env=self.env(), timeout=30)
            state = out.stdout.strip()
            if out.returncode == 0 and state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"node {self.node_name} not idle after {self.start_timeout} s (state "
                           f"{state!r})\n{self.logs()}")

    # -- using it

    def env(self, extra: dict | None = None) -> dict:
        """os.environ + SLURM_CONF of this cluster (+ extra): for client commands and jobs."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env.update({k: str(v) for k, v in (extra or {}).items()})
        return env

    def submit(self, script: str | os.PathLike, env: dict | None = None, args: list[str] = (),
               cwd: str | os.PathLike | None = None) -> int:
        """`sbatch [args] script` with os.environ + env exported to the job; returns the job id."""
        out = _run(["sbatch", "--parsable", *args, str(script)], env=self.env(env),
                   cwd=cwd, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        job_id = int(out.stdout.strip().split(";")[0])
        self._jobs.append(job_id)
        return job_id

    def job_info(self, job_id: int) -> dict:
        """The fields of `scontrol show job -o JOB` as a dict ({} once the record is gone)."""
        out = _run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env(), timeout=30)
        if out.returncode != 0:
            return {}
        # Values may hold spaces (Command=, WorkDir=); keys are Name= tokens.
        pairs = re.findall(r"(\w[\w:/]*)=(.*?)(?=\s+\w[\w:/]*=|\s*$)", out.stdout.strip())
        return dict(pairs)

    def wait(self, job_id: int, timeout: float = 120, poll: float = 0.5) -> JobResult:
        """Block until the job reaches a final state (waiting through requeues); TimeoutError else."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id) or info
            if info.get("JobState") in DONE_STATES:
                code, sig = (info.get("ExitCode") or "0:0").split(":")
                return JobResult(job_id, info["JobState"], int(code), int(sig),
                                 int(info.get("Restarts", 0)), info)
            self._check_alive()
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: "
                           f"{info.get('JobState')} ({info.get('Reason')})\n{self.logs()}")

    def wait_running(self, job_id: int, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") == "RUNNING":
                return info
            if info.get("JobState") in DONE_STATES:
                raise RuntimeError(f"job {job_id} ended before it was seen running: {info}")
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not running after {timeout} s\n{self.logs()}")

    def scancel_signal(self, job_id: int, sig: str = "USR1", batch: bool = True) -> None:
        """Send `sig` to the batch script only (batch=True) or to the job's steps (batch=False)."""
        cmd = ["scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id)]
        out = _run(cmd, env=self.env(), timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")

    def logs(self, lines: int = 30) -> str:
        """Tails of the daemons' logs, for failure messages."""
        if self.root is None:
            return ""
        parts = []
        for path in [*sorted((self.root / "log").glob("*.log")), *sorted(self.root.glob("*.out"))]:
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)
