"""A real Slurm cluster on this machine, for tests: one node (the host) or two nodes (network namespaces).

`SlurmCluster` starts munged, slurmctld and one slurmd per node from Debian's packages with a
slurm.conf in a temp dir, and tears down everything it started. The pytest fixtures at the bottom
(`slurm_1node`, `slurm_2node`) hand a started cluster to a test; the why of each setting is in
docs/SLURM.md ("Slurm on one machine").
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from unavailable import unavailable

REPO = Path(__file__).resolve().parents[1]
MARK = "segcap-slurm-test"  # tags /etc/hosts lines, the env of every process we start, temp dirs
LOCK = Path("/run/segcap-slurm-test.lock")  # one test process owns the namespaces at a time
STATE = Path("/run/segcap-slurm-test.state.json")  # what to clean up if that process died
BRIDGE = "segcapbr0"
NETNS_PREFIX = "segcap-n"  # namespace names = node names: segcap-n1, segcap-n2
SUBNETS = ("10.213.57.0/24", "10.213.58.0/24", "192.168.213.0/24")  # first one no route uses
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}  # fmt: skip
NEVER_RUNS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints"}  # pending reasons
BINARIES = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol", "scancel", "ip", "nsenter")


class ClusterUnavailable(Exception):
    """This machine cannot run the cluster (not root, packages missing): tests skip with this reason."""


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (it starts slurmd/slurmctld and network namespaces)"
    missing = [b for b in BINARIES if shutil.which(b, path=_sbin_path()) is None]
    if missing:
        return f"missing {' '.join(missing)}: run `bash scripts/install_slurm.sh`"
    return None


def _sbin_path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"


def _run(*cmd: str, check: bool = True, env: dict | None = None, timeout: float = 30, cwd=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """A started cluster: `submit` a batch script, `wait` for a state, `signal` a job, read its `output`."""

    def __init__(self, nodes: int = 1, keep: bool = False) -> None:
        if nodes not in (1, 2):
            raise ValueError("nodes is 1 (the host) or 2 (network namespaces)")
        self.num_nodes = nodes
        self.keep = keep or os.environ.get("SEGCAP_SLURM_KEEP") == "1"  # keep the temp dir for debugging
        self.host = socket.gethostname().split(".")[0]
        self.tmp: Path | None = None
        self.procs: list[subprocess.Popen] = []
        self.netns: list[str] = []
        self.bridge: str | None = None
        self.hosts_lines: list[str] = []
        self.nodes: list[str] = []
        self.addrs: dict[str, str] = {}
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ bring-up
    def start(self) -> SlurmCluster:
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        _lock_acquire()
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{MARK}-{self.num_nodes}n-"))
            self.tmp.chmod(0o755)  # munged wants its socket's directories searchable by all
            for d in ("etc", "munge", "ctld", "spool", "run", "log", "jobs", "state"):
                (self.tmp / d).mkdir()
            self._save_state()
            if self.num_nodes == 1:
                self.nodes, ctl_addr = [self.host], "127.0.0.1"
                self.addrs = {self.host: "127.0.0.1"}
                if not _resolves(self.host):
                    self._add_hosts_line(f"127.0.0.1 {self.host}")
            else:
                ctl_addr = self._make_network()
            for node in self.nodes:
                (self.tmp / "spool" / node).mkdir()
            self.env = self._base_env()
            self._write_conf(ctl_addr)
            self._start_munge()
            self._spawn(["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)], "slurmctld")
            self._wait_ctld()
            for node in self.nodes:
                cmd = ["slurmd", "-D", "-N", node, "-f", str(self.conf)]
                if node in self.netns:  # nsenter, not `ip netns exec`: that remounts /sys and breaks slurmd
                    cmd = ["nsenter", f"--net=/var/run/netns/{node}", *cmd]
                self._spawn(cmd, f"slurmd-{node}")
            self._wait_nodes_idle(60)
        except BaseException:
            self.stop()
            raise
        return self

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.update(
            PATH=_sbin_path(),
            SLURM_CONF=str(self.tmp / "etc" / "slurm.conf"),
            SEGCAP_PYTHON=sys.executable,
            SEGCAP_STATE_DIR=str(self.tmp / "state"),  # requeue flags: not in the repo's slurm/logs
            PYTHONUNBUFFERED="1",
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            SEGCAP_SLURM_TEST_CLUSTER=str(self.tmp),  # marks every process started for this cluster
        )
        if self.num_nodes > 1:  # the same interface name on both nodes, so gloo binds the bridge-facing one
            env["GLOO_SOCKET_IFNAME"] = "eth0"
        return env

    @property
    def conf(self) -> Path:
        return self.tmp / "etc" / "slurm.conf"

    def _make_network(self) -> str:
        net = _pick_subnet()
        hosts = list(net.hosts())
        gateway = str(hosts[0])
        self.bridge = BRIDGE
        self._save_state()
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{gateway}/{net.prefixlen}", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for i in (1, 2):
            name, addr = f"{NETNS_PREFIX}{i}", str(hosts[10 + i])
            self.netns.append(name)
            self._save_state()
            _run("ip", "netns", "add", name)
            outer, inner = f"{name}-h", f"{name}-c"
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", outer, "master", BRIDGE, "up")
            _run("ip", "link", "set", inner, "netns", name)
            _run("ip", "-n", name, "link", "set", inner, "name", "eth0")  # same name on every node (gloo)
            _run("ip", "-n", name, "addr", "add", f"{addr}/{net.prefixlen}", "dev", "eth0")
            _run("ip", "-n", name, "link", "set", "eth0", "up")
            _run("ip", "-n", name, "link", "set", "lo", "up")
            # No default route: from inside a node only the bridge's subnet is reachable.
            self._add_hosts_line(f"{addr} {name}")
            self.nodes.append(name)
            self.addrs[name] = addr
        return gateway

    def _add_hosts_line(self, entry: str) -> None:
        line = f"{entry}  # {MARK} {os.getpid()}"
        with open("/etc/hosts", "a") as f:  # in place: /etc/hosts may be a bind mount
            f.write(line + "\n")
        self.hosts_lines.append(line)
        self._save_state()

    def _write_conf(self, ctl_addr: str) -> None:
        t = self.tmp
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={self.addrs[n]} CPUs=2 RealMemory=2048 State=UNKNOWN" for n in self.nodes
        )
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py ({MARK}); see docs/SLURM.md for why each line is here.
ClusterName=segcaptest
SlurmctldHost={self.host}({ctl_addr})
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={t}/munge/munge.socket,cred_expire=10
StateSaveLocation={t}/ctld
SlurmdSpoolDir={t}/spool/%n
SlurmctldPidFile={t}/run/slurmctld.pid
SlurmdPidFile={t}/run/slurmd-%n.pid
SlurmctldLogFile={t}/log/slurmctld.log
SlurmdLogFile={t}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
JobRequeue=1
KillWait=3
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
JobCompType=jobcomp/filetxt
JobCompLoc={t}/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
{nodes}
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
""")

    def _start_munge(self) -> None:
        m = self.tmp / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))  # a fresh key: the cluster never trusts anything outside itself
        key.chmod(0o400)
        self._spawn(
            ["munged", "-F", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
             f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed", f"--log-file={self.tmp}/log/munged.log"],
            "munged",
        )  # fmt: skip
        _until(lambda: (m / "munge.socket").exists(), 15, "munged socket", self)

    def _spawn(self, cmd: list[str], name: str) -> None:
        with open(self.tmp / "log" / f"{name}.stdout", "ab") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                               stdin=subprocess.DEVNULL, start_new_session=True))  # fmt: skip
        self._save_state()

    def _wait_ctld(self) -> None:
        def up() -> bool:
            self._check_daemons()
            return self.scontrol("ping", check=False).stdout.count("UP") > 0

        _until(up, 30, "slurmctld to answer ping", self)

    def _wait_nodes_idle(self, timeout: float) -> None:
        def idle() -> bool:
            self._check_daemons()
            states = self.node_states()
            return len(states) == len(self.nodes) and all(s.split("+")[0] == "IDLE" for s in states.values())

        _until(idle, timeout, "all nodes IDLE", self)

    def _check_daemons(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{' '.join(p.args)} exited with {p.returncode}\n{self.logs()}")

    # ------------------------------------------------------------------ use
    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("scontrol", *args, check=check, env=self.env)

    def node_states(self) -> dict[str, str]:
        out = self.scontrol("show", "node", "-o", check=False).stdout
        return {f["NodeName"]: f["State"] for f in map(_fields, out.splitlines()) if "NodeName" in f}

    def submit(self, script: str | Path, args=(), sbatch_args=(), env: dict | None = None, cwd=REPO) -> int:
        """`sbatch --parsable [sbatch_args] script [args]` from cwd; returns the job id.

        The job's environment is the cluster's (SLURM_CONF, SEGCAP_PYTHON, GLOO_SOCKET_IFNAME on 2 nodes...)
        updated with `env`. Output goes to the cluster's temp dir unless sbatch_args name --output.
        """
        sbatch_args = list(sbatch_args)
        if not any(a.startswith(("--output", "-o")) for a in sbatch_args):
            sbatch_args.append(f"--output={self.tmp}/jobs/%x-%j.out")
        env = {**self.env, **(env or {})}
        p = _run("sbatch", "--parsable", *sbatch_args, str(script), *map(str, args), env=env, cwd=cwd)
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, StdOut, NodeList, ...)."""
        p = self.scontrol("show", "job", "-o", str(job_id), check=False)
        return _fields(p.stdout.strip()) if p.returncode == 0 else {}

    def wait(self, job_id: int, states=("COMPLETED",), timeout: float = 60, restarts: int | None = None) -> dict:
        """Until the job is in one of `states` (and has been restarted `restarts` times, if given).

        A job that reaches another final state, or the timeout, fails the test with its record,
        output and the daemons' logs.
        """
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "?")
            if state in states and (restarts is None or int(info.get("Restarts", 0)) == restarts):
                return info
            if state == "PENDING" and info.get("Reason") in NEVER_RUNS:
                raise AssertionError(f"job {job_id} can never run here ({info['Reason']})\n{self.report(job_id)}")
            if state in TERMINAL and state not in states:
                raise AssertionError(f"job {job_id} ended {state}, wanted {sorted(states)}\n{self.report(job_id)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state} after {timeout}s\n{self.report(job_id)}")
            self._check_daemons()
            time.sleep(0.3)

    def wait_output(self, job_id: int, pattern: str, timeout: float = 60, count: int = 1) -> list[str]:
        """Until the job's output file matches the regex `pattern` `count` times; returns the matches."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.findall(pattern, self.output(job_id), re.MULTILINE)
            if len(found) >= count:
                return found
            state = self.job(job_id).get("JobState", "?")
            if state in TERMINAL or time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} ({state}) printed /{pattern}/ {len(found)} of {count} times\n{self.report(job_id)}"
                )
            time.sleep(0.3)

    def signal(self, job_id: int, sig: str = "USR1", target: str = "batch") -> None:
        """Send `sig`: to the batch shell only ("batch", what --signal=B: does), to every step's tasks
        ("steps"), or to the batch shell, its children and all steps ("full")."""
        flag = {"batch": ["--batch"], "steps": [], "full": ["--full"]}[target]
        _run("scancel", f"--signal={sig}", *flag, str(job_id), env=self.env)

    def rank_pids(self, job_id: int) -> dict[int, int]:
        """{rank: pid} of the processes segcap_launch started for the job (to kill one, e.g. with SIGKILL)."""
        found: dict[int, tuple[int, int]] = {}  # rank -> (pid, parent pid)
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                env = dict(e.split(b"=", 1) for e in (d / "environ").read_bytes().split(b"\0") if b"=" in e)
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if env.get(b"SEGCAP_SLURM_TEST_CLUSTER") == str(self.tmp).encode() and env.get(b"SLURM_JOB_ID") == str(
                job_id
            ).encode() and b"RANK" in env:  # fmt: skip
                found[int(d.name)] = (int(env[b"RANK"]), ppid)
        # the rank's own process is the top-most one carrying RANK (its children, e.g. loader workers, do too)
        return {rank: pid for pid, (rank, ppid) in found.items() if ppid not in found}

    def cancel(self, job_id: int) -> None:
        _run("scancel", str(job_id), env=self.env, check=False)

    def output(self, job_id: int) -> str:
        path = self.job(job_id).get("StdOut")
        return Path(path).read_text(errors="replace") if path and Path(path).exists() else ""

    def logs(self, tail: int = 40) -> str:
        if self.tmp is None or not (self.tmp / "log").exists():
            return ""
        parts = []
        for f in sorted((self.tmp / "log").iterdir()):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    def report(self, job_id: int) -> str:
        return f"--- job record\n{self.job(job_id)}\n--- job output\n{self.output(job_id)[-4000:]}\n{self.logs()}"

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job and wait until no node is allocated (between tests)."""
        _run("scancel", "--user=root", env=self.env, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = [n for n, s in self.node_states().items() if s.split("+")[0] != "IDLE"]
            if not busy:
                return
            time.sleep(0.3)

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        """Stop every process this cluster started, remove namespaces, bridge, /etc/hosts lines, temp dir."""
        if self.procs:
            _run("scancel", "--user=root", env=self.env, check=False, timeout=10)
            time.sleep(0.5)
        for p in reversed(self.procs):  # slurmds, then slurmctld, then munged
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self.tmp is not None:
            _kill_marked(str(self.tmp))  # slurmstepd and job processes outlive slurmd
        _teardown_network(self.netns, self.bridge)
        _remove_hosts_lines(self.hosts_lines)
        if self.tmp is not None and not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.procs, self.netns, self.bridge, self.hosts_lines = [], [], None, []
        _lock_release(self)

    def _save_state(self) -> None:
        _CLUSTERS[id(self)] = {
            "tmp": str(self.tmp), "netns": self.netns, "bridge": self.bridge,
            "hosts_lines": self.hosts_lines, "pid": os.getpid(),
        }  # fmt: skip
        STATE.write_text(json.dumps(list(_CLUSTERS.values())))


# ---------------------------------------------------------------------- process-wide bookkeeping
# Several clusters may live in one test process (1-node and 2-node side by side); the lock is held
# while any does, so a second test process waits instead of fighting over names and namespaces.
_CLUSTERS: dict[int, dict] = {}
_lock_fd: int | None = None


def _lock_acquire(timeout: float = 300) -> None:
    global _lock_fd
    if _lock_fd is not None:
        return
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RuntimeError(f"another test process holds {LOCK} (a Slurm test cluster is running)")
            time.sleep(1)
    _lock_fd = fd
    _cleanup_stale()


def _lock_release(cluster: SlurmCluster) -> None:
    global _lock_fd
    _CLUSTERS.pop(id(cluster), None)
    if _CLUSTERS or _lock_fd is None:
        if _CLUSTERS:
            STATE.write_text(json.dumps(list(_CLUSTERS.values())))
        return
    STATE.unlink(missing_ok=True)
    fcntl.flock(_lock_fd, fcntl.LOCK_UN)
    os.close(_lock_fd)
    _lock_fd = None


def _cleanup_stale() -> None:
    """We hold the lock, so whatever an earlier test process left (it was killed) is garbage: remove it."""
    stale = json.loads(STATE.read_text()) if STATE.exists() else []
    for s in stale:
        if s.get("tmp") and s["tmp"] != "None":
            _kill_marked(s["tmp"])
            shutil.rmtree(s["tmp"], ignore_errors=True)
    leftover_ns = [n for n in _run("ip", "netns", "list", check=False).stdout.split() if n.startswith(NETNS_PREFIX)]
    for ns in leftover_ns:
        _kill_pids(_run("ip", "netns", "pids", ns, check=False).stdout.split())
    bridge = BRIDGE if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0 else None
    _teardown_network(leftover_ns, bridge)
    _remove_hosts_lines(None)
    STATE.unlink(missing_ok=True)


def _kill_marked(tmp: str) -> None:
    """Kill every process whose environment says it was started for the cluster in `tmp`."""
    needle = f"SEGCAP_SLURM_TEST_CLUSTER={tmp}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(d.name)
            except OSError:
                pass
    _kill_pids(pids)


def _kill_pids(pids) -> None:
    pids = [int(p) for p in pids if int(p) != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _teardown_network(netns: list[str], bridge: str | None) -> None:
    for ns in netns:
        _run("ip", "netns", "del", ns, check=False)  # takes the veth pair with it
        _run("ip", "link", "del", f"{ns}-h", check=False)  # in case the namespace never got its end
    if bridge:
        _run("ip", "link", "del", bridge, check=False)


def _remove_hosts_lines(lines: list[str] | None) -> None:
    """Remove the given lines (None: every line carrying our mark) from /etc/hosts, in place."""
    try:
        text = Path("/etc/hosts").read_text()
    except OSError:
        return
    keep = [ln for ln in text.splitlines() if not (ln in lines if lines is not None else f"# {MARK}" in ln)]
    new = "\n".join(keep) + "\n"
    if new != text:
        with open("/etc/hosts", "r+") as f:
            f.write(new)
            f.truncate()


def _pick_subnet() -> ipaddress.IPv4Network:
    routes = _run("ip", "-4", "route", "show", "table", "all", check=False).stdout
    used = [ipaddress.ip_network(w, strict=False) for w in re.findall(r"\b\d+\.\d+\.\d+\.\d+/\d+\b", routes)]
    for cidr in [os.environ.get("SEGCAP_SLURM_SUBNET"), *SUBNETS]:
        if cidr:
            net = ipaddress.ip_network(cidr)
            if not any(net.overlaps(u) for u in used):
                return net
    raise RuntimeError(f"every candidate subnet {SUBNETS} overlaps a route; set SEGCAP_SLURM_SUBNET")


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def _fields(line: str) -> dict[str, str]:
    """`Key=Value Key2=Value two ...` (scontrol -o) -> dict; values may hold spaces up to the next Key=."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", line.strip()):
        out[m.group(1)] = m.group(2)
    return out


def _until(pred, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{cluster.logs()}")
        time.sleep(0.2)


# ---------------------------------------------------------------------- pytest fixtures
# One cluster of each size per test session (bring-up is seconds); each test gets it with every job
# of the previous test cancelled. Use: `def test_x(slurm_2node): job = slurm_2node.submit(...)`.
@pytest.fixture(scope="session")
def _slurm_1node_session():
    yield from _session_cluster(1)


@pytest.fixture(scope="session")
def _slurm_2node_session():
    yield from _session_cluster(2)


def _session_cluster(nodes: int):
    try:
        cluster = SlurmCluster(nodes).start()
    except ClusterUnavailable as e:
        unavailable(f"Slurm cluster unavailable: {e}")  # CI installs Slurm and runs as root
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_1node(_slurm_1node_session):
    yield _slurm_1node_session
    _slurm_1node_session.cancel_all()


@pytest.fixture
def slurm_2node(_slurm_2node_session):
    yield _slurm_2node_session
    _slurm_2node_session.cancel_all()
