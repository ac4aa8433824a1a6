"""A real Slurm (Debian slurm-wlm 22.05 + munge) of one or two nodes, started for the tests, then removed.

    with SlurmCluster(nodes=2) as cluster:         # installs the packages if they are missing
        job = cluster.submit("job.sh", args=["--nodes=2"], env={"X": "1"}, cwd=repo)
        result = cluster.wait(job, timeout=60)     # JobResult(state="COMPLETED", exit_code=0, ...)
        cluster.exec_on("node2", ["hostname"])     # a command inside node 2 (prints node2)

Each node is a Linux network + UTS + mount namespace with its own hostname (node1, node2) and
address (10.77.0.11, .12); the controller (mnctl, 10.77.0.1) and the bridge joining them live in a
third network namespace, so nothing is added to the machine's own network and no route leads out.
Between the nodes it is real TCP: a job's ranks talk over the bridge, a node can be cut off
(`set_link(node, up=False)`), its slurmd killed and restarted. Every daemon runs as
`nsenter --net=NS unshare --uts --mount -- sh -c 'mount --bind HOSTS /etc/hosts; hostname H; exec CMD'`:
the bind mounts exist only inside that mount namespace, so nothing in /etc changes (`ip netns exec`
is not used: it remounts /sys and hides the cgroup tree, and slurmd then fails to start). Jobs
inherit their node's namespaces. Client commands (sbatch, squeue, scontrol) run the same way in the
controller's namespace and find the cluster through SLURM_CONF (`env()`; jobs inherit it).

munged runs in the machine's own namespaces with a private key and socket (a unix socket is
reachable from every network namespace). Everything else lives in its own folder under BASE
(`/tmp/blip2-dist-slurm/run-*`): slurm.conf, state and spool dirs, logs, hosts files. Namespace
names are `b2s<id>c`, `b2s<id>n1`, ... with the id of that folder, so two sessions can each run a
cluster (same addresses, separate bridges), and a system Slurm, if any, is left alone.

Teardown (also on errors): cancel the jobs, TERM then KILL every process inside the cluster's
namespaces and every process carrying its SLURM_CONF, stop munged, delete the namespaces (that
removes the veths and the bridge), remove the folder. A run that crashed before its teardown leaves
an `owner.json` naming its owner process, daemons and namespaces; the next start cleans every such
folder whose owner is gone, and any `b2s*` namespace whose folder is gone, the same way.

Needs root, `ip`/`nsenter`/`unshare`, network namespaces, and apt for the first install;
`SlurmUnavailable` is raised otherwise (the tests skip with its reason). Any other failure is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

BASE = Path(os.environ.get("BLIP2_SLURM_BASE", "/tmp/blip2-dist-slurm"))
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NEEDED_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "munged", "ip", "nsenter", "unshare")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
NS_PREFIX = "b2s"
SUBNET = "10.77.0"
CONTROLLER = "mnctl"
CPUS_PER_NODE = 2  # both "nodes" share this machine's cores; each claims the 2 it has
# Terminal job states (a requeued job passes through REQUEUED/PENDING and is not done yet).
DONE_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be had on this machine (not root, no apt, no namespaces): skip, not fail."""


@dataclass
class JobResult:
    job_id: int
    state: str  # JobState, e.g. COMPLETED, FAILED
    exit_code: int  # the batch script's exit code (from ExitCode=N:SIG)
    signal: int  # the signal that ended it, 0 if none
    restarts: int  # Restarts= (how often it was requeued)
    info: dict  # every field of `scontrol show job -o`


# ---- installation ------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_installed() -> None:
    """apt-get install the Slurm + munge packages unless already there (idempotent, ~15 s once)."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the Slurm tests need root (to install slurm, make namespaces, run daemons)")
    if all(shutil.which(b) for b in NEEDED_BINARIES):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"slurm is not installed and there is no apt-get to install {PACKAGES}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=300",
        *PACKAGES,
        "iproute2",
        "util-linux",
    ]
    with _no_service_start():
        out = _run(install, timeout=900, env=env, stdin=subprocess.DEVNULL)
        if out.returncode != 0:  # stale or missing package lists: refresh once, try again
            _run(
                ["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"],
                timeout=900,
                env=env,
                stdin=subprocess.DEVNULL,
            )
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


def check_namespaces() -> None:
    """Make and delete a throw-away network namespace: SlurmUnavailable (with the reason) if we can't."""
    name = f"{NS_PREFIX}probe{os.getpid()}"
    out = _run(["ip", "netns", "add", name], timeout=30)
    if out.returncode != 0:
        raise SlurmUnavailable(f"cannot make network namespaces (`ip netns add`): {out.stderr.strip()}")
    try:
        probe = _run(
            [
                "nsenter",
                f"--net=/run/netns/{name}",
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "--",
                "true",
            ],
            timeout=30,
        )
        if probe.returncode != 0:
            raise SlurmUnavailable(f"cannot enter namespaces (nsenter/unshare): {probe.stderr.strip()}")
    finally:
        _run(["ip", "netns", "del", name], timeout=30)


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


def netns_pids(ns: str) -> list[int]:
    """Processes inside network namespace `ns` (none if it does not exist)."""
    out = _run(["ip", "netns", "pids", ns], timeout=30)
    return [int(p) for p in out.stdout.split() if p.isdigit() and int(p) != os.getpid()]


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


def _teardown(namespaces: list[str], conf: Path, daemon_pids: list[int], grace: float) -> None:
    """End everything of one cluster: processes in its namespaces, job processes, daemons; then
    delete the namespaces (their veths and bridge go with them)."""
    for _ in range(3):  # a dying slurmstepd may still fork: look again
        pids = sorted(
            {
                *(p for ns in namespaces for p in netns_pids(ns)),
                *_pids_with_env(f"SLURM_CONF={conf}"),
                *(p for p in daemon_pids if _alive(p)),
            }
        )
        if not pids:
            break
        _terminate(pids, grace=grace)
    existing = set(_run(["ip", "netns", "list"], timeout=30).stdout.split())
    for ns in namespaces:
        if ns in existing:
            _run(["ip", "netns", "del", ns], timeout=30)


def clean_stale(base: Path = BASE) -> None:
    """End the clusters whose owning process died without teardown (found by owner.json), and
    namespaces of ours (NS_PREFIX + id) whose run folder is gone."""
    live_ids = set()
    if base.is_dir():
        for run_dir in base.glob("run-*"):
            try:
                meta = json.loads((run_dir / "owner.json").read_text())
            except (OSError, ValueError):
                meta = {}
            if meta.get("owner_pid") and _alive(int(meta["owner_pid"])):
                live_ids.add(run_dir.name.rsplit("-", 1)[-1])
                continue  # another live session's cluster
            _teardown(
                meta.get("namespaces", []), run_dir / "slurm.conf", list(meta.get("daemons", {}).values()), grace=5
            )
            shutil.rmtree(run_dir, ignore_errors=True)
    listing = _run(["ip", "netns", "list"], timeout=30).stdout.split()
    orphans = [
        ns
        for ns in listing
        if re.fullmatch(rf"{NS_PREFIX}[0-9a-f]{{8}}(c|n\d+)", ns)
        and ns[len(NS_PREFIX) : len(NS_PREFIX) + 8] not in live_ids
    ]
    if orphans:
        _teardown(orphans, Path("/nonexistent"), [], grace=5)


# ---- the cluster -------------------------------------------------------------------------------


class SlurmCluster:
    """A controller + `nodes` nodes (node1, node2, ...) in their own namespaces, its own munged."""

    def __init__(
        self,
        nodes: int = 2,
        cred_expire: int = 5,
        slurmd_timeout: int = 15,
        start_timeout: float = 60.0,
        base: Path = BASE,
    ):
        # cred_expire: seconds a requeued job waits before it may start again (Slurm's minimum is 5,
        # default 120); also the life of a step credential (srun uses it within a second).
        # slurmd_timeout: seconds without an answer from a node's slurmd before Slurm sets the node
        # DOWN and fails its jobs (NODE_FAIL); short so the node-loss test is quick.
        self.num_nodes = nodes
        self.cred_expire = cred_expire
        self.slurmd_timeout = slurmd_timeout
        self.start_timeout = start_timeout
        self.base = Path(base)
        self.root: Path | None = None
        self.conf: Path | None = None
        self.id = ""
        self.node_names = [f"node{i}" for i in range(1, nodes + 1)]
        self._procs: dict[str, subprocess.Popen] = {}
        self._stopped: set[str] = set()  # daemons stopped on purpose (kill_slurmd): not an error
        self._jobs: list[int] = []

    # -- naming

    def netns(self, host: str) -> str:
        """The network namespace of `host` (CONTROLLER or a node name)."""
        return f"{NS_PREFIX}{self.id}" + ("c" if host == CONTROLLER else "n" + host[len("node") :])

    def address(self, host: str) -> str:
        return f"{SUBNET}.1" if host == CONTROLLER else f"{SUBNET}.1{host[len('node') :]}"

    @property
    def namespaces(self) -> list[str]:
        return [self.netns(CONTROLLER), *(self.netns(n) for n in self.node_names)]

    # -- life cycle

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        ensure_installed()
        check_namespaces()
        clean_stale(self.base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # munged (as munge) must reach its socket below it
        self.id = uuid.uuid4().hex[:8]
        self.root = self.base / f"run-{os.getpid()}-{self.id}"
        self.root.mkdir(mode=0o755)
        self.conf = self.root / "slurm.conf"
        self._write_owner()  # before the namespaces exist, so a crash from here on is cleaned
        try:
            self._make_network()
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", CONTROLLER, ["slurmctld", "-D", "-f", str(self.conf)])
            for node in self.node_names:
                self.start_slurmd(node)
            self.wait_nodes("idle", self.node_names, timeout=self.start_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel jobs, end every process of the cluster, delete its namespaces and folder. Safe to repeat."""
        if self.root is None:
            return
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self._cancel_all()
        daemons = [p.pid for p in self._procs.values()]
        _teardown(self.namespaces, self.conf, daemons, grace=10)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        if not os.environ.get("BLIP2_SLURM_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _cancel_all(self) -> None:
        if self._jobs:
            self.client(["scancel", "--full", *map(str, self._jobs)], timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = self.client(["squeue", "-h", "-o", "%i"], timeout=30)
            if out.returncode == 0 and not out.stdout.strip():
                return
            time.sleep(0.5)

    # -- set-up pieces

    def _write_owner(self) -> None:
        meta = {
            "owner_pid": os.getpid(),
            "namespaces": self.namespaces,
            "daemons": {n: p.pid for n, p in self._procs.items()},
        }
        (self.root / "owner.json").write_text(json.dumps(meta))

    def _make_network(self) -> None:
        """Bridge br0 (10.77.0.1) in the controller's namespace; per node a veth pair whose inner
        end is the node's eth0 (10.77.0.1N). Per host a hosts file naming every host."""
        ctl = self.netns(CONTROLLER)
        cmds = [["ip", "netns", "add", ns] for ns in self.namespaces]
        cmds += [
            ["ip", "-n", ctl, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", ctl, "addr", "add", f"{self.address(CONTROLLER)}/24", "dev", "br0"],
            ["ip", "-n", ctl, "link", "set", "br0", "up"],
            ["ip", "-n", ctl, "link", "set", "lo", "up"],
        ]
        for node in self.node_names:
            ns, veth = self.netns(node), self._veth(node)
            cmds += [
                ["ip", "-n", ctl, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
                ["ip", "-n", ctl, "link", "set", veth, "master", "br0"],
                ["ip", "-n", ctl, "link", "set", veth, "up"],
                ["ip", "-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0"],
                ["ip", "-n", ns, "link", "set", "eth0", "up"],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
            ]
        for cmd in cmds:
            out = _run(cmd, timeout=30)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
        hosts = "".join(f"{self.address(h)} {h}\n" for h in [CONTROLLER, *self.node_names])
        (self.root / "hosts").write_text(f"127.0.0.1 localhost\n{hosts}")
        (self.root / "resolv.conf").write_text("")  # no DNS: every name is in the hosts file

    @staticmethod
    def _veth(node: str) -> str:
        return "v" + node[len("node") :]

    def wrap(self, host: str, cmd: list[str]) -> list[str]:
        """`cmd` run inside `host`'s namespaces, with its hostname and hosts file."""
        setup = (
            'mount --bind "$B2S_HOSTS" /etc/hosts && mount --bind "$B2S_RESOLV" /etc/resolv.conf '
            '&& hostname "$B2S_HOST" && exec "$@"'
        )
        return [
            "env",
            f"B2S_HOSTS={self.root / 'hosts'}",
            f"B2S_RESOLV={self.root / 'resolv.conf'}",
            f"B2S_HOST={host}",
            "nsenter",
            f"--net=/run/netns/{self.netns(host)}",
            "unshare",
            "--uts",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            setup,
            "sh",
            *cmd,
        ]

    def _spawn(self, name: str, host: str, cmd: list[str], **kw) -> None:
        log = open(self.root / f"{name}.out", "ab")
        # Marked with SLURM_CONF so teardown can find them and their children (slurmstepd, tasks).
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._procs[name] = subprocess.Popen(
            self.wrap(host, cmd) if host else cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.root,
            start_new_session=True,
            **kw,
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
        self._spawn(
            "munged",
            "",
            [
                "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={mdir / 'munged.pid'}",
                f"--log-file={mdir / 'munged.log'}",
                f"--seed-file={mdir / 'munged.seed'}",
            ],
            user="munge",
            group="munge",
            extra_groups=[],
        )
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
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        r = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={self.address(n)} NodeHostname={n} CPUs={CPUS_PER_NODE} Boards=1 "
            f"SocketsPerBoard=1 CoresPerSocket={CPUS_PER_NODE} ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN"
            for n in self.node_names
        )
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py: a {self.num_nodes}-node test cluster in namespaces; see that file.
ClusterName=blip2test
SlurmctldHost={CONTROLLER}({self.address(CONTROLLER)})
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
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
# Binds each task to the CPUs of its allocation, so a task sees what --cpus-per-task gave it.
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout={self.slurmd_timeout}
# Schedule often: a requeued job becomes eligible after cred_expire, then waits for a pass.
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=10
MinJobAge=600
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None and name not in self._stopped:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    # -- nodes

    def start_slurmd(self, node: str) -> None:
        self._stopped.discard(f"slurmd-{node}")
        self._spawn(f"slurmd-{node}", node, ["slurmd", "-D", "-f", str(self.conf), "-N", node])

    def kill_slurmd(self, node: str) -> None:
        """SIGKILL node's slurmd (its job steps keep running, as on a real node whose daemon died)."""
        name = f"slurmd-{node}"
        self._stopped.add(name)
        self._procs[name].kill()
        self._procs[name].wait(timeout=30)

    def set_link(self, node: str, up: bool) -> None:
        """Cut `node` off the network (its veth on the bridge down) or reconnect it."""
        cmd = ["ip", "-n", self.netns(CONTROLLER), "link", "set", self._veth(node), "up" if up else "down"]
        out = _run(cmd, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")

    def node_state(self, node: str) -> str:
        """sinfo's state of `node` (idle, allocated, down*, ...)."""
        return self.client(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], timeout=30).stdout.strip()

    def wait_nodes(self, state: str, nodes: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict = {}
        while time.monotonic() < deadline:
            self._check_alive()
            states = {n: self.node_state(n) for n in nodes}
            if all(s.rstrip("*") == state for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not {state} after {timeout} s: {states}\n{self.logs()}")

    def node_pids(self, node: str) -> list[int]:
        """Every process inside `node` (its slurmd, slurmstepd and job processes)."""
        return netns_pids(self.netns(node))

    def exec_on(self, node: str, cmd: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Start `cmd` inside `node` (a process as a job would run there, without Slurm)."""
        full_env = self.env(env)
        return subprocess.Popen(self.wrap(node, cmd), env=full_env, start_new_session=True, **kw)

    # -- using it

    def env(self, extra: dict | None = None) -> dict:
        """os.environ + SLURM_CONF of this cluster (+ extra): for client commands and jobs."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env.update({k: str(v) for k, v in (extra or {}).items()})
        return env

    def client(self, cmd: list[str], env: dict | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, squeue, scontrol, ...) run on the controller host."""
        return _run(self.wrap(CONTROLLER, cmd), env=self.env(env), timeout=timeout, **kw)

    def submit(
        self,
        script: str | os.PathLike,
        env: dict | None = None,
        args: list[str] = (),
        cwd: str | os.PathLike | None = None,
    ) -> int:
        """`sbatch [args] script` with os.environ + env exported to the job; returns the job id."""
        out = self.client(["sbatch", "--parsable", *args, str(script)], env=env, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        job_id = int(out.stdout.strip().split(";")[0])
        self._jobs.append(job_id)
        return job_id

    def job_info(self, job_id: int) -> dict:
        """The fields of `scontrol show job -o JOB` as a dict ({} once the record is gone)."""
        out = self.client(["scontrol", "show", "job", "-o", str(job_id)], timeout=30)
        if out.returncode != 0:
            return {}
        # Values may hold spaces (Command=, WorkDir=); keys are Name= tokens.
        pairs = re.findall(r"(\w[\w:/]*)=(.*?)(?=\s+\w[\w:/]*=|\s*$)", out.stdout.strip())
        return dict(pairs)

    def wait(self, job_id: int, timeout: float = 120, poll: float = 0.5, seen: list | None = None) -> JobResult:
        """Block until the job reaches a final state (waiting through requeues); TimeoutError else.
        `seen`, if given, collects every (JobState, Restarts) the job passed through."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id) or info
            if seen is not None and info and (not seen or seen[-1] != (info.get("JobState"), info.get("Restarts"))):
                seen.append((info.get("JobState"), info.get("Restarts")))
            if info.get("JobState") in DONE_STATES:
                code, sig = (info.get("ExitCode") or "0:0").split(":")
                return JobResult(job_id, info["JobState"], int(code), int(sig), int(info.get("Restarts", 0)), info)
            self._check_alive()
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} not finished after {timeout} s: {info.get('JobState')} ({info.get('Reason')})\n{self.logs()}"
        )

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
        out = self.client(cmd, timeout=30)
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
