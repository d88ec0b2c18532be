"""`launcher runs compare` (differing params, final and best metrics, the UI's compare URL) and
`launcher runs sync` (upload what a run dir's MLflow journal holds that the store does not).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from launcher.spool import Journal, sync

LOWER_IS_BETTER = ("loss", "time", "memory", "skipped")


def resolve(ref: str, uri: str | None) -> tuple[str, str]:
    """A run dir or a run id -> (run id, tracking URI). A run dir knows both (its journal)."""
    path = Path(ref)
    if path.is_dir():
        journal_dir = path / "mlflow"
        run_id = (journal_dir / "run_id").read_text().strip() if (journal_dir / "run_id").exists() else None
        if run_id is None:
            raise ValueError(f"{path}: no MLflow run id in {journal_dir} (never reached the store? try `runs sync {path}`)")
        return run_id, uri or (journal_dir / "uri").read_text().strip()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(f"{ref!r} is no run dir; for a run id give --tracking-uri or set MLFLOW_TRACKING_URI")
    return ref, uri


def compare(refs: list[str], uri: str | None = None) -> str:
    from mlflow import MlflowClient

    if len(refs) < 2:
        raise ValueError("runs compare needs at least two runs")
    resolved = [resolve(r, uri) for r in refs]
    uris = {u for _, u in resolved}
    if len(uris) > 1:
        raise ValueError(f"the runs live in different stores: {sorted(uris)}")
    store = uris.pop()
    client = MlflowClient(tracking_uri=store)
    runs = [client.get_run(run_id) for run_id, _ in resolved]
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]

    lines = ["runs: " + "  ".join(f"{n} ({r.info.run_id}, {r.info.status})" for n, r in zip(names, runs))]
    keys = sorted({k for r in runs for k in r.data.params})
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    lines.append(f"\nparams that differ ({len(differ)} of {len(keys)}):")
    lines += _table(["param", *names], [[k, *(r.data.params.get(k, "-") for r in runs)] for k in differ])

    metric_keys = sorted({k for r in runs for k in r.data.metrics})
    rows = []
    for k in metric_keys:
        row = [k]
        for r in runs:
            hist = client.get_metric_history(r.info.run_id, k)
            if not hist:
                row += ["-", "-"]
                continue
            final = max(hist, key=lambda m: (m.step, m.timestamp)).value
            pick = min if any(w in k for w in LOWER_IS_BETTER) else max
            best = pick(m.value for m in hist if not math.isnan(m.value)) if any(not math.isnan(m.value) for m in hist) else math.nan
            row += [f"{final:.4g}", f"{best:.4g}"]
        rows.append(row)
    lines.append("\nmetrics (final / best; best = min for loss, time, memory, skips, else max):")
    lines += _table(["metric", *(f"{n} {w}" for n in names for w in ("final", "best"))], rows)
    lines.append("\nMLflow UI: " + compare_url(store, [r.info.run_id for r in runs], {r.info.experiment_id for r in runs}))
    return "\n".join(lines)


def compare_url(uri: str, run_ids: list[str], experiment_ids: set[str]) -> str:
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    url = f"{base}/#/compare-runs?runs={json.dumps(run_ids, separators=(',', ':'))}" \
          f"&experiments={json.dumps(sorted(experiment_ids), separators=(',', ':'))}"
    if base != uri.rstrip("/"):
        url += f"   (after: mlflow ui --backend-store-uri {uri} --port 5000)"
    return url


def sync_run_dir(run_dir: str, uri: str | None = None, timeout: float = 300.0) -> int:
    """`runs sync`: 0 when the store has everything, 1 when some of the journal is still not applied."""
    journal = Journal(run_dir)
    uri = uri or ((journal.dir / "uri").read_text().strip() if (journal.dir / "uri").exists() else None)
    if uri is None:
        raise ValueError(f"{run_dir}: no tracking URI recorded in {journal.dir}; give --tracking-uri")
    before = journal.pending()
    left = sync(run_dir, uri, timeout)
    print(f"[segcap] {run_dir}: {before - left} of {before} spooled bytes applied to {uri}; {left} left")
    return 0 if left == 0 else 1


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header)] + [fmt.format(*map(str, r)) for r in rows]
