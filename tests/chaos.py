"""Fault-injection campaign on real 2-rank ZeRO-3 tiny runs (gloo, DeepSpeed, MLflow on SQLite):
`python -m tests.chaos --trials 5 --seed 0 [--faults kill,signal,disk,tamper] [--work DIR] [--out FILE.json]`.

Each trial injects one fault at a seeded random point (tests/chaos_rank.py arms it inside a rank),
resubmits the run until it finishes, and compares it with one uninterrupted run: losses at every
step, metrics.jsonl rows, MLflow history. Prints one row per fault (README's table). Needs root for
the disk fault (a tmpfs mount as the checkpoint folder).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY, EVAL_EVERY, BATCH, WORLD = 6, 2, 3, 4, 2
PHASES = ("startup", "step", "save", "eval")
FAULTS = ("kill", "signal", "disk", "tamper")
GRACE_S = 60.0  # a rank whose peer died must exit by itself within this (else: counted as a hang)


@dataclass
class Trial:
    fault: str
    trial: int
    spec: dict
    landed: str = "?"  # the phase the fault hit (from the rank's own log)
    submits: int = 0
    equal_losses: bool = False
    steps_lost: int = 0
    steps_repeated: int = 0
    data_lost: int = 0  # samples of steps whose loss differs from the uninterrupted run's
    hangs: int = 0
    mlflow_ok: bool = False  # every step once, or its repeats named by a replayed/restart_N tag
    checks: dict = field(default_factory=dict)  # fault-specific expectations -> met?
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return (self.equal_losses and not (self.steps_lost or self.steps_repeated or self.data_lost or self.hangs)
                and self.mlflow_ok and all(self.checks.values()) and not self.error)


# --- running ranks ------------------------------------------------------------------------------------

def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.train=[{{name: synthetic, path: {shards}/train}}]",
        f"data.val=[{{name: synthetic_val, path: {shards}/val}}]",
        f"data.batch_size={BATCH}", f"data.eval_batch_size={BATCH}",
        f"train.output_dir={run_dir}", f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}",
        f"train.eval_every={EVAL_EVERY}", f"tracking.tracking_uri=sqlite:///{run_dir}/mlflow.db",
        *extra,
    ]


def run_ranks(args: list[str], run_dir: Path, fault: dict | None = None, timeout: float = 600) -> tuple[list[int], str, int]:
    """Start one process per rank (as srun does), the fault armed in rank fault["rank"]. Returns the
    exit codes, the output, and 1 if a rank outlived a dead peer by GRACE_S (it is then killed, as
    srun --kill-on-bad-exit would)."""
    from launcher.dist import free_port

    port, procs = str(free_port()), []
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = [open(run_dir / f"rank{r}.out", "a") for r in range(WORLD)]  # noqa: SIM115 (closed below)
    for rank in range(WORLD):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "SEGCAP_CHAOS_LOG": str(run_dir / "chaos.jsonl"),
               "SEGCAP_CHAOS": json.dumps(fault) if fault and fault["rank"] == rank else ""}
        env.pop("MLFLOW_RUN_ID", None)
        cmd = [sys.executable, "-m", "tests.chaos_rank", "train", "--config", "configs/train/tiny.yaml", *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[rank], stderr=subprocess.STDOUT))
    hang, deadline, first_death = 0, time.time() + timeout, None
    while any(p.poll() is None for p in procs):
        now = time.time()
        codes = [p.poll() for p in procs]
        if first_death is None and any(c not in (None, 0, 3) for c in codes):
            first_death = now
        if now > deadline or (first_death is not None and now - first_death > GRACE_S):
            hang = 1
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    for f in logs:
        f.close()
    out = "\n".join((run_dir / f"rank{r}.out").read_text()[-20000:] for r in range(WORLD))
    return [p.returncode for p in procs], out, hang


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def phase_log(run_dir: Path) -> list[dict]:
    path = run_dir / "chaos.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# --- the campaign ---------------------------------------------------------------------------------------

class Campaign:
    def __init__(self, work: Path, seed: int, log=print):
        self.work, self.seed, self.log = work, seed, log
        self.shards = work / "shards"
        if not (self.shards / "train").is_dir():
            from datapipes.config import SyntheticConfig
            from datapipes.synthetic import write_synthetic

            write_synthetic(SyntheticConfig(out_dir=str(self.shards), num_train=160, num_val=12, samples_per_shard=40))
        self.base = work / "uninterrupted"
        if not (self.base / "metrics.jsonl").is_file():
            shutil.rmtree(self.base, ignore_errors=True)
            codes, out, _ = run_ranks(overrides(self.shards, self.base, "train.keep_checkpoints=1"), self.base)
            if codes != [0, 0]:
                raise RuntimeError(f"the uninterrupted run failed {codes}:\n{out[-4000:]}")
        self.want = {r["step"]: r["train/loss"] for r in rows(self.base)}
        self.durations = self._durations()
        ckpts = self.base / "checkpoints"
        self.ckpt_bytes = sum(p.stat().st_size for p in ckpts.rglob("*") if p.is_file())

    def _durations(self) -> dict[str, float]:
        """Mean seconds per phase in the uninterrupted run (rank 0): where a random delay may land."""
        log = [r for r in phase_log(self.base) if r["rank"] == 0]
        spans: dict[str, list[float]] = {"save": [], "eval": []}
        opened = {}
        for r in log:
            if "enter" in r:
                opened[r["enter"]] = r["t"]
            elif "leave" in r and r["leave"] in spans:
                spans[r["leave"]].append(r["t"] - opened[r["leave"]])
        first = min((r["t"] for r in log if r.get("enter") in ("save", "eval")), default=30.0)
        return {"startup": first * 0.5, "step": 1.0, **{k: sum(v) / len(v) if v else 1.0 for k, v in spans.items()}}

    def _check(self, t: Trial, run_dir: Path) -> None:
        got = rows(run_dir)
        steps = [r["step"] for r in got]
        t.steps_repeated = len(steps) - len(set(steps))
        t.steps_lost = len(set(self.want) - set(steps))
        losses = {r["step"]: r["train/loss"] for r in got}
        differ = [s for s in self.want if s in losses and abs(losses[s] - self.want[s]) > 1e-5 * max(1.0, abs(self.want[s]))]
        t.data_lost = len(differ) * BATCH * WORLD
        t.equal_losses = not differ and not t.steps_lost
        t.mlflow_ok = self._mlflow_ok(run_dir, t)

    def _mlflow_ok(self, run_dir: Path, t: Trial) -> bool:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
        run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
        history = client.get_metric_history(run.info.run_id, "train/loss")
        seen: dict[int, int] = {}
        for m in history:
            seen[m.step] = seen.get(m.step, 0) + 1
        named = set()
        for k, v in run.data.tags.items():
            if k.startswith("replayed/restart_"):
                named |= set(json.loads(v)["replayed_steps"])
        twice = {s for s, n in seen.items() if n > 1}
        t.checks["mlflow: every step present"] = set(seen) == set(self.want)
        t.checks["mlflow: repeats named"] = twice <= named
        return set(seen) == set(self.want) and twice <= named

    def _finish(self, t: Trial, run_dir: Path, args: list[str], tries: int = 3) -> str:
        """Resubmit until the run completes; returns the last output."""
        out = ""
        for _ in range(tries):
            codes, out, hang = run_ranks(args, run_dir)
            t.submits += 1
            t.hangs += hang
            if codes == [0, 0]:
                return out
        t.error = f"did not finish after {tries} resubmits: {codes}"
        return out

    def _landed(self, run_dir: Path) -> str:
        fired = [r for r in phase_log(run_dir) if "fired" in r]
        return fired[0]["phase"] if fired else "after the run"

    def trial(self, fault: str, i: int) -> Trial:
        rng = random.Random(f"{self.seed}/{fault}/{i}")
        run_dir = self.work / f"{fault}_{i:03d}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.time()
        t = getattr(self, f"_{fault}")(rng, i, run_dir)
        t.seconds = round(time.time() - t0, 1)
        return t

    def _spec(self, rng: random.Random, i: int, sig: int) -> dict:
        """Trial i of a fault hits the phases in turn (a kill starts at "save", a signal at "eval": what
        one CI trial each covers), at a random occurrence, delay and rank."""
        phase = PHASES[(i + (2 if sig == signal.SIGKILL else 3)) % len(PHASES)]
        nth = {"startup": 1, "step": rng.randint(1, STEPS), "save": rng.randint(1, STEPS // SAVE_EVERY),
               "eval": rng.randint(1, 2)}[phase]
        return {"sig": sig, "phase": phase, "nth": nth, "delay": round(rng.uniform(0, self.durations[phase]), 3),
                "rank": rng.randrange(WORLD)}

    def _kill(self, rng, i, run_dir) -> Trial:
        t = Trial("kill", i, self._spec(rng, i, signal.SIGKILL))
        args = overrides(self.shards, run_dir)
        codes, _, hang = run_ranks(args, run_dir, t.spec)
        t.submits, t.hangs, t.landed = 1, hang, self._landed(run_dir)
        if codes != [0, 0]:
            self._finish(t, run_dir, args)
        self._check(t, run_dir)
        return t

    def _signal(self, rng, i, run_dir) -> Trial:
        t = Trial("signal", i, self._spec(rng, i, rng.choice([signal.SIGUSR1, signal.SIGTERM])))
        args = overrides(self.shards, run_dir)
        codes, _, hang = run_ranks(args, run_dir, t.spec)
        t.submits, t.hangs, t.landed = 1, hang, self._landed(run_dir)
        t.checks["every rank exits 3 (or 0 after the last step)"] = codes in ([3, 3], [0, 0])
        if codes == [0, 0]:  # no requeue: only right if the signal came during the last step or later
            fired = [r for r in phase_log(run_dir) if "fired" in r]
            t.checks["a signal before the last step requeues"] = not fired or fired[0]["counts"]["step"] >= STEPS - 1
        if codes == [3, 3]:
            stopped = max(r["step"] for r in rows(run_dir))
            from launcher.checkpoint import latest_complete

            last = latest_complete(run_dir / "checkpoints")
            t.checks["checkpoint at the stop step"] = last is not None and last.name == f"step_{stopped:08d}"
        if codes != [0, 0]:
            self._finish(t, run_dir, args)
        self._check(t, run_dir)
        return t

    def _disk(self, rng, i, run_dir) -> Trial:
        """The checkpoint folder is a tmpfs that holds the first checkpoint and part of the second."""
        from launcher.checkpoint import latest_complete, manifest_problem

        size = int(self.ckpt_bytes * rng.uniform(1.1, 1.9)) // 4096 * 4096
        t = Trial("disk", i, {"tmpfs_bytes": size, "checkpoint_bytes": self.ckpt_bytes})
        ckpts = run_dir / "checkpoints"
        ckpts.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(ckpts)], check=True)
        args = overrides(self.shards, run_dir, "train.keep_checkpoints=1")
        try:
            codes, out, hang = run_ranks(args, run_dir)
            t.submits, t.hangs, t.landed = 1, hang, "save"
            t.checks["run stops (non-zero exit)"] = all(c not in (0, 3) for c in codes)
            t.checks["error names the save and the full disk"] = "checkpoint save of step" in out and "the disk is full" in out
            last = latest_complete(ckpts)
            t.checks["previous checkpoint intact"] = last is not None and last.name == tag(SAVE_EVERY) and manifest_problem(last) is None
            t.spec["partial"] = sorted(p.name for p in ckpts.glob("step_*") if not (p / "COMPLETE").exists())
        finally:
            keep = Path(tempfile.mkdtemp(dir=self.work))
            shutil.copytree(ckpts, keep / "c", symlinks=True)
            subprocess.run(["umount", str(ckpts)], check=True)
            ckpts.rmdir()
            shutil.move(str(keep / "c"), str(ckpts))
            keep.rmdir()
        out = self._finish(t, run_dir, args)  # space freed: the resubmitted job resumes
        t.checks["resumed from the previous checkpoint"] = f"resumed from {ckpts / tag(SAVE_EVERY)}" in out
        self._check(t, run_dir)
        return t

    def _tamper(self, rng, i, run_dir) -> Trial:
        """Stop at step 4 (checkpoints 2 and 4), damage step 4, resubmit: step 2 is resumed from."""
        how = ("delete", "truncate", "flip")[i % 3]
        t = Trial("tamper", i, {"how": how})
        args = overrides(self.shards, run_dir)
        stop = {"sig": signal.SIGUSR1, "phase": "step", "nth": 2 * SAVE_EVERY, "delay": 0.0, "rank": rng.randrange(WORLD)}
        codes, _, hang = run_ranks(args, run_dir, stop)
        t.submits, t.hangs = 1, hang
        from launcher.checkpoint import complete_checkpoints

        done = complete_checkpoints(run_dir / "checkpoints")
        if codes != [3, 3] or len(done) < 2:
            t.error = f"the stop before tampering went wrong: {codes}, {[p.name for p in done]}"
            return t
        victim_dir, previous = done[-1], done[-2]
        files = sorted(json.loads((victim_dir / "COMPLETE").read_text())["files"])
        name = rng.choice(files)
        victim = victim_dir / name
        t.spec.update(file=name, checkpoint=victim_dir.name)
        if how == "delete":
            victim.unlink()
        elif how == "truncate":
            os.truncate(victim, rng.randrange(victim.stat().st_size))
        else:
            data = bytearray(victim.read_bytes())
            data[rng.randrange(len(data))] ^= 0xFF
            victim.write_bytes(bytes(data))
        t.landed = "load"
        out = self._finish(t, run_dir, args)
        t.checks["refusal names the file"] = f"checkpoint {victim_dir} refused" in out and name in out
        t.checks["fell back to the previous one"] = f"resumed from {previous}" in out
        self._check(t, run_dir)
        return t


def tag(step: int) -> str:
    return f"step_{step:08d}"


def summarize(trials: list[Trial]) -> list[dict]:
    table = []
    for fault in dict.fromkeys(t.fault for t in trials):
        ts = [t for t in trials if t.fault == fault]
        landed: dict[str, int] = {}
        for t in ts:
            landed[t.landed] = landed.get(t.landed, 0) + 1
        table.append({
            "fault": fault, "trials": len(ts), "resumed_equal": sum(t.equal_losses for t in ts),
            "steps_lost": sum(t.steps_lost for t in ts), "steps_repeated": sum(t.steps_repeated for t in ts),
            "data_lost": sum(t.data_lost for t in ts), "hangs": sum(t.hangs for t in ts),
            "all_checks": sum(t.ok for t in ts), "landed": landed,
        })
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| fault | trials | resumed, equal losses | steps lost | steps repeated | data lost | hangs | all checks met | where it hit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        where = ", ".join(f"{k} {v}" for k, v in sorted(r["landed"].items()))
        lines.append(f"| {r['fault']} | {r['trials']} | {r['resumed_equal']} | {r['steps_lost']} | {r['steps_repeated']} "
                     f"| {r['data_lost']} | {r['hangs']} | {r['all_checks']} | {where} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4, help="trials per fault")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first trial index (to continue a campaign in --work)")
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--work", default=None, help="folder for the runs (default: a new temporary one)")
    p.add_argument("--out", default=None, help="write every trial and the table as JSON here")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="segcap_chaos_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    campaign = Campaign(work, args.seed)
    trials = []
    for i in range(args.start, args.start + args.trials):
        for fault in args.faults.split(","):
            t = campaign.trial(fault, i)
            trials.append(t)
            print(json.dumps({**asdict(t), "ok": t.ok}), flush=True)
    table = summarize(trials)
    print(markdown(table))
    print(f"{len(trials)} trials in {time.time() - t0:.0f} s (work dir {work})")
    if args.out:
        Path(args.out).write_text(json.dumps({"trials": [asdict(t) for t in trials], "table": table}, indent=1))
    return 0 if all(t.ok for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
