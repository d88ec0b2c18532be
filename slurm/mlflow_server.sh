#!/usr/bin/env bash
# An MLflow tracking server for many jobs: `mlflow server` on a PostgreSQL backend store with artifacts
# under a shared folder. Run it as a long job (sbatch slurm/mlflow_server.sh) or on a login/service
# node (bash slurm/mlflow_server.sh); it prints the MLFLOW_TRACKING_URI for training jobs and writes
# it to $SEGCAP_MLFLOW_DIR/tracking_uri, so a job script can `export MLFLOW_TRACKING_URI=$(cat ...)`.
#
# Environment (all optional):
#   SEGCAP_MLFLOW_DIR   shared folder for the database files, the artifacts and tracking_uri
#                       (default <repo>/mlflow)
#   SEGCAP_MLFLOW_DB    a PostgreSQL URI (postgresql+psycopg2://user:pw@host:5432/db) of a database you run;
#                       unset: this script runs its own PostgreSQL in $SEGCAP_MLFLOW_DIR/pgdata
#   SEGCAP_MLFLOW_HOST  the address the server listens on and jobs connect to (default: hostname -f)
#   SEGCAP_MLFLOW_PORT  default 5000;  SEGCAP_PG_PORT: the private PostgreSQL's port, default 5433
#   SEGCAP_MLFLOW_WORKERS  server worker processes, default 4
#SBATCH --job-name=segcap-mlflow
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=7-00:00:00
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
for SEGCAP_REPO in "${SEGCAP_REPO:-}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "${BASH_SOURCE[0]}")/.." ""; do
    [[ -f "$SEGCAP_REPO/slurm/mlflow_server.sh" ]] && break
done
[[ -n "$SEGCAP_REPO" ]] || { echo "mlflow_server.sh: run it from the repo root or export SEGCAP_REPO" >&2; exit 2; }
SEGCAP_REPO="$(cd "$SEGCAP_REPO" && pwd)"
PY="${SEGCAP_PYTHON:-python3}"
dir="$(mkdir -p "${SEGCAP_MLFLOW_DIR:-$SEGCAP_REPO/mlflow}" && cd "${SEGCAP_MLFLOW_DIR:-$SEGCAP_REPO/mlflow}" && pwd)"
host="${SEGCAP_MLFLOW_HOST:-$(hostname -f 2>/dev/null || hostname)}"
port="${SEGCAP_MLFLOW_PORT:-5000}"
log() { printf '[mlflow_server %(%F %T)T] %s\n' -1 "$*"; }

# PostgreSQL refuses to run as root: as root, its files belong to the `postgres` user (Debian's package).
as_pg() {
    if [[ "$(id -u)" -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
pg_bin() {  # Debian keeps the server programs out of PATH
    local b
    for b in "$(command -v "$1" 2>/dev/null)" /usr/lib/postgresql/*/bin/"$1"; do
        [[ -x "$b" ]] && { echo "$b"; return; }
    done
    echo "mlflow_server.sh: $1 not found (install PostgreSQL: apt-get install postgresql)" >&2
    return 1
}

server="" pgdata=""
cleanup() {  # the server first (15 s grace, then SIGKILL), then PostgreSQL (fast: it cuts open sessions)
    if [[ -n "$server" ]]; then
        kill -TERM "$server" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$server" 2>/dev/null || break; sleep 0.5; done
        pkill -KILL -P "$server" 2>/dev/null || true
        kill -KILL "$server" 2>/dev/null || true
    fi
    if [[ -n "$pgdata" ]]; then as_pg "$pg_ctl" -D "$pgdata" -m fast -w -t 30 stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT

db="${SEGCAP_MLFLOW_DB:-}"
if [[ -z "$db" ]]; then
    pgroot="$dir/postgres" pgport="${SEGCAP_PG_PORT:-5433}"
    initdb="$(pg_bin initdb)" pg_ctl="$(pg_bin pg_ctl)" psql="$(pg_bin psql)"
    mkdir -p "$pgroot/data" "$pgroot/sock"
    chmod 700 "$pgroot/data"
    if [[ "$(id -u)" -eq 0 ]]; then chown -R postgres: "$pgroot"; fi
    if [[ ! -f "$pgroot/data/PG_VERSION" ]]; then
        log "initdb $pgroot/data"
        as_pg "$initdb" -D "$pgroot/data" -U mlflow -A trust --no-sync -E UTF8 >/dev/null
    fi
    # A job killed without stopping PostgreSQL leaves its pid file: pg_ctl start copes with a stale one.
    log "PostgreSQL on 127.0.0.1:$pgport ($pgroot)"
    as_pg "$pg_ctl" -D "$pgroot/data" -l "$pgroot/postgres.log" -w -t 60 \
        -o "-p $pgport -k $pgroot/sock -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
    pgdata="$pgroot/data"
    q() { as_pg "$psql" -h "$pgroot/sock" -p "$pgport" -U mlflow -d postgres -tAc "$1"; }
    [[ "$(q "SELECT 1 FROM pg_database WHERE datname='mlflow'")" == 1 ]] || q "CREATE DATABASE mlflow" >/dev/null
    db="postgresql+psycopg2://mlflow@127.0.0.1:$pgport/mlflow"  # psycopg2-binary (setup.py)
fi

mkdir -p "$dir/artifacts"
uri="http://$host:$port"
echo "$uri" >"$dir/tracking_uri"
log "backend store $db, artifacts $dir/artifacts"
echo "export MLFLOW_TRACKING_URI=$uri"
# In the background, not exec: the EXIT trap then stops the private PostgreSQL when the server ends.
"$PY" -m mlflow server --backend-store-uri "$db" --artifacts-destination "$dir/artifacts" \
    --host "$host" --port "$port" --workers "${SEGCAP_MLFLOW_WORKERS:-4}" \
    --allowed-hosts "$host,$host:$port,localhost:$port,127.0.0.1:$port" &
server=$!
wait "$server"
