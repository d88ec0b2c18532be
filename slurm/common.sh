# shellcheck shell=bash
# slurm/common.sh: what stage1.sh, stage2.sh, eval.sh and run.sh share (sourced, not run).
# segcap_launch starts one task per GPU with srun, forwards preemption signals to the ranks, and
# requeues the job when the ranks exit with 3 ("checkpoint saved, run me again"). docs/SLURM.md says why.

SEGCAP_EXIT_REQUEUE=3  # launcher.train.EXIT_REQUEUE

segcap_log() { printf '[segcap %(%F %T)T] %s\n' -1 "$*"; }

# The environment every rank needs: repo dir, python, rendezvous address and port, accelerator.
segcap_setup() {
    SEGCAP_REPO="$(cd "$SEGCAP_REPO" && pwd)" || return
    export SEGCAP_REPO
    cd "$SEGCAP_REPO" || return
    export SEGCAP_PYTHON="${SEGCAP_PYTHON:-python3}"
    export PYTHONUNBUFFERED=1
    # The first node of the allocation hosts the rendezvous (torch's TCPStore on rank 0). The port is
    # derived from the job id: stable across a requeue, different for jobs sharing a node.
    local -a hosts
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    export MASTER_ADDR="${MASTER_ADDR:-${hosts[0]}}"
    export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    # Per-job op-build and Triton caches on node-local disk: a build killed by preemption leaves a lock
    # that would hang, silently, every later job sharing the directory (docs/LEARNED.md). Set either
    # variable to reuse a prebuilt cache on purpose.
    local cache="${TMPDIR:-/tmp}/segcap-${SLURM_JOB_ID}"
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$cache/torch_extensions}"
    export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$cache/triton}"
    # GPUs on this node: Slurm's count when GPUs were requested as GRES, else what the driver shows.
    local gpus="${SLURM_GPUS_ON_NODE:-}"
    if [[ -z "$gpus" ]]; then
        gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    fi
    if [[ "${gpus:-0}" -eq 0 ]]; then
        export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"  # DeepSpeed's CPU accelerator; the launcher picks gloo
    fi
    segcap_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}:" \
        "${SLURM_JOB_NUM_NODES} node(s) ${SLURM_JOB_NODELIST}, ${SLURM_NTASKS} task(s), ${gpus:-0} GPU(s) per node"
    segcap_log "rendezvous ${MASTER_ADDR}:${MASTER_PORT}  python ${SEGCAP_PYTHON}  repo ${SEGCAP_REPO}" \
        "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-}" \
        "DS_ACCELERATOR=${DS_ACCELERATOR:-}"
}

# segcap_run_dir CONFIG OVERRIDE...: the run directory. SEGCAP_RUN_DIR wins, else
# ${SEGCAP_RUN_ROOT:-<repo>/runs}/${SEGCAP_RUN_NAME:-<config name>[-<hash of the overrides>]}. The same
# command gives the same directory, so a requeued or resubmitted job resumes from its checkpoints.
segcap_run_dir() {
    local config="$1"
    shift
    if [[ -n "${SEGCAP_RUN_DIR:-}" ]]; then
        printf '%s\n' "$SEGCAP_RUN_DIR"
        return
    fi
    local name
    name="$(basename "$config")"
    name="${name%.yaml}"
    if (($#)); then
        name="${name}-$(printf '%s\n' "$@" | sha1sum | cut -c1-8)"
    fi
    printf '%s\n' "${SEGCAP_RUN_ROOT:-$SEGCAP_REPO/runs}/${SEGCAP_RUN_NAME:-$name}"
}

# segcap_launcher VERB DEFAULT_CONFIG ARG...: `python -m launcher VERB --config C [key=value ...]` on every
# rank. ARG is `[--config C] [key=value ...]` as given to sbatch; train.output_dir is added unless given.
segcap_launcher() {
    local verb="$1" config="$2"
    shift 2
    local -a overrides=()
    while (($#)); do
        case "$1" in
            --config) config="$2"; shift 2 ;;
            --config=*) config="${1#--config=}"; shift ;;
            *) overrides+=("$1"); shift ;;
        esac
    done
    local run_dir="" o
    for o in "${overrides[@]}"; do
        [[ "$o" == train.output_dir=* ]] && run_dir="${o#train.output_dir=}"
    done
    if [[ -z "$run_dir" ]]; then
        run_dir="$(segcap_run_dir "$config" "${overrides[@]}")"
        overrides+=("train.output_dir=$run_dir")
    fi
    mkdir -p "$run_dir"
    printf '%s job=%s restart=%s nodes=%s log=%s\n' "$(date +%FT%T)" "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" \
        "$SLURM_JOB_NODELIST" "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *StdOut=//p')" \
        >>"$run_dir/slurm_jobs.txt"
    segcap_log "run dir ${run_dir}"
    segcap_launch "$SEGCAP_PYTHON" -m launcher "$verb" --config "$config" "${overrides[@]}"
}

# segcap_launch CMD...: run CMD once per task of the allocation (one per GPU) and wait for it.
# Each task gets torch's env:// names from Slurm's: RANK, LOCAL_RANK, WORLD_SIZE. SIGUSR1 or SIGTERM
# to this shell reaches every rank as SIGUSR1. Exit code 3 requeues the job; any other is returned.
segcap_launch() {
    local -a srun_args=(--kill-on-bad-exit=1 --label --export=ALL)
    # Slurm 22.05's srun no longer reads SLURM_CPUS_PER_TASK: pass the job's value on.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi
    # Rank 0 leaves this file when it exits 3. The ranks report 3 to srun as 0: the first rank to exit
    # with a non-zero code would make --kill-on-bad-exit SIGTERM the others while they are still
    # shutting down, and srun would then return 143 instead of 3.
    export SEGCAP_REQUEUE_FLAG="${SEGCAP_STATE_DIR:-$SEGCAP_REPO/slurm/logs}/.requeue-${SLURM_CLUSTER_NAME:-}-${SLURM_JOB_ID}"
    mkdir -p "$(dirname "$SEGCAP_REQUEUE_FLAG")"
    rm -f "$SEGCAP_REQUEUE_FLAG"
    segcap_log "srun ${srun_args[*]} $*"
    # The task's shell traps the signals so that it outlives the rank (Slurm signals every process of
    # the step, so the rank gets them directly) and can map the rank's exit code.
    # shellcheck disable=SC2016  # expanded by each task's own shell, not this one
    srun "${srun_args[@]}" bash -c '
        export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
        trap : USR1 TERM
        "$@"
        rc=$?
        if [ "$rc" -eq 3 ]; then
            if [ "$RANK" -eq 0 ]; then touch "$SEGCAP_REQUEUE_FLAG"; fi
            exit 0
        fi
        exit "$rc"' segcap-rank "$@" &
    SEGCAP_STEP_PID=$!
    trap '_segcap_forward USR1' USR1
    trap '_segcap_forward TERM' TERM
    local rc
    _segcap_wait "$SEGCAP_STEP_PID"
    rc=$SEGCAP_STEP_RC
    trap - USR1 TERM
    if [[ "$rc" -eq 0 && -e "$SEGCAP_REQUEUE_FLAG" ]]; then
        rc=$SEGCAP_EXIT_REQUEUE
    fi
    rm -f "$SEGCAP_REQUEUE_FLAG"
    if [[ "$rc" -eq "$SEGCAP_EXIT_REQUEUE" ]]; then
        # Requeue only a job that is still RUNNING: a cancelled job stays cancelled, and a preempted
        # one is requeued (or not) by Slurm itself, by the cluster's PreemptMode.
        local state
        state="$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *JobState=\([A-Z_]*\).*/\1/p')"
        local max_requeue
        max_requeue="$(scontrol show config 2>/dev/null | sed -n 's/^MaxBatchRequeue *= *\([0-9][0-9]*\).*/\1/p')"
        if [[ "$state" != RUNNING ]]; then
            segcap_log "ranks exited ${rc} (checkpoint saved) but the job is ${state:-?}: not requeueing"
        elif [[ -n "$max_requeue" && "${SLURM_RESTART_COUNT:-0}" -ge "$max_requeue" ]]; then
            # Past the limit Slurm holds the requeued job (JobHoldMaxRequeue): pending, nothing in this log.
            segcap_log "ranks exited ${rc} (checkpoint saved) but job ${SLURM_JOB_ID} was already requeued" \
                "${SLURM_RESTART_COUNT:-0} time(s), Slurm's MaxBatchRequeue=${max_requeue}: not requeueing." \
                "Resubmit the same command to resume from the last checkpoint."
        else
            segcap_log "ranks exited ${rc} (checkpoint saved, run me again): requeueing job ${SLURM_JOB_ID}"
            if scontrol requeue "$SLURM_JOB_ID"; then
                return 0
            fi
            segcap_log "scontrol requeue failed; resubmit the same command to resume"
        fi
    elif [[ "$rc" -ne 0 ]]; then
        segcap_log "ranks exited ${rc}"
    fi
    return "$rc"
}

# The batch shell got a signal: Slurm's --signal=B:USR1@T warning, `scancel --batch --signal=...`, or
# the SIGTERM of a preemption or cancel. srun passes SIGUSR1 on to every task, but turns a SIGTERM it
# receives itself into SIGKILL of all tasks, so every signal is forwarded as SIGUSR1.
_segcap_forward() {
    SEGCAP_TRAPPED=1
    segcap_log "got SIG$1: forwarding SIGUSR1 to the ranks (srun pid ${SEGCAP_STEP_PID})"
    kill -USR1 "$SEGCAP_STEP_PID" 2>/dev/null || true
}

# Wait for srun across trapped signals (a trap interrupts `wait` with status 128+n while srun runs on).
_segcap_wait() {
    local pid="$1" rc last=""
    while :; do
        SEGCAP_TRAPPED=0
        if wait "$pid"; then rc=0; else rc=$?; fi
        if [[ "$rc" -eq 127 && -n "$last" ]]; then
            rc="$last"  # the status was collected by the interrupted wait after all
            break
        fi
        [[ "$SEGCAP_TRAPPED" -eq 1 ]] || break
        last="$rc"
    done
    SEGCAP_STEP_RC="$rc"
}
