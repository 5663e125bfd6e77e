#!/usr/bin/env bash
# End-to-end test of the SLURM profile (configs/profiles/slurm) on a one-node SLURM cluster that
# this script sets up on this machine (`make test-slurm`; docs/cluster.md):
#   1. installs Debian's slurm-wlm, slurmdbd, munge and mariadb-server when missing (apt-get),
#      and the project's `cluster` extra (snakemake-executor-plugin-slurm) when missing;
#   2. starts munged, a private MariaDB (its own data folder and socket, TCP on 127.0.0.1 only),
#      slurmdbd, slurmctld and slurmd: one node, this host, addressed as 127.0.0.1, with one GPU
#      declared as a generic resource without a device, so that the profile's GPU requests
#      (train, saliency, evaluate_model) are scheduled and accounted; torch finds no CUDA and
#      runs on the CPU;
#   3. runs a small demo (configs/demo.yaml with 3 slides of 1536 px, erm only, 2 epochs:
#      16 Snakemake jobs) through the profile, then the same workflow locally (--cores 2); before
#      that, a dry run of the profile with WSI_SCAAT_SLURM_SLIDES_PER_JOB=2 (batches of slides);
#   4. checks with sacct the grouped submissions: tile, train, evaluate_model and evaluate one
#      SLURM job per Snakemake job, saliency + stitch + export one SLURM job per slide (a group
#      job), train_stores none (a local rule), all COMPLETED, the GPU jobs with gres/gpu: 9 SLURM
#      jobs instead of 15; that the local run ran each stage as its own job (no groups); and that
#      both runs' outputs are equal (tests/cluster/compare_outputs.py).
# Exit status 0 and a last line `PASS: ...` when all holds; otherwise `FAIL: <what>`, the tails of
# the daemons' logs, and the Snakemake log to read.
#
# Run it as root on a throwaway machine (CI runner, container). 5.5 to 7 minutes on 2 CPU cores
# shared with other work (load 5-7), package installs included (apt-get ~20 s, nearby mirror).
#
# Everything it writes goes to a fresh folder (printed; WSI_SCAAT_SLURM_WORK picks another):
# configs, daemon state and logs, the cohort and both runs. Nothing is written under /etc/slurm
# or /etc/mysql: the clients find the cluster through SLURM_CONF, and srun inside the jobs
# (which runs without SLURM_CONF) through configless SLURM's /run/slurm/conf link, removed at the
# end. Munge is the system's: /etc/munge/munge.key is created when missing, a running munged is
# reused. Ports: MariaDB 16816, slurmctld 16817, slurmd 16818, slurmdbd 16819
# (WSI_SCAAT_SLURM_PORT_BASE=N moves them to N+6..N+9). The daemons it started are stopped on
# exit; KEEP_CLUSTER=1 leaves them running (`export SLURM_CONF=<folder>/etc/slurm.conf`, then
# sinfo / sacct / squeue talk to the test cluster).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
T0=$SECONDS
log() { printf '[run_slurm %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
fail() {
    printf '[run_slurm] FAIL: %s\n' "$*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || fail "run as root: it installs packages and starts the SLURM daemons"
[[ -x $PY ]] || fail "no Python at $PY (make install first, or set PYTHON)"

# ---- 1. packages -----------------------------------------------------------------------------
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sacct:slurm-client slurmdbd:slurmdbd munged:munge \
    mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null || [[ -x /usr/sbin/${pair%%:*} ]] || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    log "installing slurm-wlm slurmdbd munge mariadb-server (missing: ${need[*]})"
    t=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm slurmdbd munge mariadb-server >/dev/null
    log "apt-get took $((SECONDS - t)) s"
fi
export PATH=$PATH:/usr/sbin
if ! "$PY" -c "import snakemake_executor_plugin_slurm" 2>/dev/null; then
    log "installing the project's 'cluster' extra (snakemake-executor-plugin-slurm)"
    "$PY" -m pip install --quiet -c "${REPO}/requirements.lock" -e "${REPO}[cluster]"
fi

# ---- 2. cluster ------------------------------------------------------------------------------
# srun inside a job reads /etc/slurm/slurm.conf, or else /run/slurm/conf (see configless below):
# with either present, the jobs would talk to another cluster.
[[ ! -e /etc/slurm/slurm.conf ]] ||
    fail "/etc/slurm/slurm.conf exists: this machine has a SLURM setup; run the test on a throwaway one"
[[ ! -e /run/slurm/conf ]] || fail "/run/slurm/conf exists: a configless slurmd runs here (another cluster, or KEEP_CLUSTER=1)"
WORK=${WSI_SCAAT_SLURM_WORK:-$(mktemp -d /tmp/wsi-scaat-slurm.XXXXXX)}
mkdir -p "$WORK"/{etc,log,pid,state,spool,db}
WORK=$(cd "$WORK" && pwd)
BASE=${WSI_SCAAT_SLURM_PORT_BASE:-16810}
DB_PORT=$((BASE + 6)) CTLD_PORT=$((BASE + 7)) SLURMD_PORT=$((BASE + 8)) DBD_PORT=$((BASE + 9))
NODE=$(hostname -s)
CLUSTER=wsiscaat
export SLURM_CONF=$WORK/etc/slurm.conf
log "work folder $WORK"

started=()   # pid files of the daemons started here, stopped in reverse order on exit
cleanup() {
    local rc=$?
    if [[ ${KEEP_CLUSTER:-0} != 1 ]] && command -v scancel >/dev/null && [[ -e ${SLURM_CONF:-} ]]; then
        scancel -u root >/dev/null 2>&1 || true   # jobs still queued or running (a failed run)
    fi
    if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
        log "KEEP_CLUSTER=1: daemons left running (export SLURM_CONF=$SLURM_CONF)"
    else
        for ((i = ${#started[@]} - 1; i >= 0; i--)); do
            local pid
            pid=$(cat "${started[i]}" 2>/dev/null) || continue
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        done
        # the link configless slurmd made to its config cache (see below)
        if [[ $(readlink /run/slurm/conf 2>/dev/null) == "$WORK"/* ]]; then
            rm -f /run/slurm/conf
            rmdir /run/slurm 2>/dev/null || true
        fi
    fi
    if ((rc)); then
        echo "[run_slurm] failed after $((SECONDS - T0)) s; logs under $WORK/log" >&2
        for f in "$WORK"/log/*.log; do
            [[ -s $f ]] && { echo "---- tail $f" >&2; tail -n 15 "$f" >&2; }
        done
    fi
}
trap cleanup EXIT

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.5 s
    local limit=$1 what=$2
    shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || fail "$what not ready after ${limit} s"
        sleep 0.5
    done
}

# munge: the key and the socket folder belong to the munge user; munged refuses otherwise.
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n </dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    started+=(/run/munge/munged.pid)
    wait_for 10 munged sh -c 'munge -n </dev/null | unmunge'
fi

# MariaDB, private: own data folder and socket, TCP on 127.0.0.1 only.
DB_PASS=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
mariadb-install-db --no-defaults --user=root --datadir="$WORK/db/data" \
    --auth-root-authentication-method=socket >"$WORK/log/mariadb-install.log" 2>&1 ||
    fail "mariadb-install-db failed (see $WORK/log/mariadb-install.log)"
mariadbd --no-defaults --user=root --datadir="$WORK/db/data" --socket="$WORK/db/mysqld.sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$WORK/pid/mariadbd.pid" \
    --log-error="$WORK/log/mariadbd.log" --innodb-buffer-pool-size=64M &
echo $! >"$WORK/pid/mariadbd.pid" # (mariadbd writes the same pid there once it is up)
started+=("$WORK/pid/mariadbd.pid")
SQL=(mariadb --no-defaults --socket="$WORK/db/mysqld.sock" -u root)
wait_for 60 MariaDB "${SQL[@]}" -e "SELECT 1"
"${SQL[@]}" <<SQL
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# SLURM: root runs everything; no cgroups (proctrack/linuxproc, task/none, no jobacct_gather),
# so --mem and --cpus-per-task are scheduled but not enforced. config_overrides: the node
# offers the CPUs, memory and GPU written here whatever the machine has, so that the profile's
# requests (up to 16 GB and a GPU) can be scheduled on a small CI machine.
CPUS=$(nproc)
((CPUS >= 2)) || CPUS=2
cat >"$WORK/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=$WORK/log/slurmdbd.log
PidFile=$WORK/pid/slurmdbd.pid
EOF
chmod 0600 "$WORK/etc/slurmdbd.conf"
cat >"$WORK/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/pid/slurmctld.pid
SlurmdPidFile=$WORK/pid/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoreFlags=job_comment
AccountingStorageTRES=gres/gpu
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SlurmctldParameters=enable_configless
ReturnToService=2
MinJobAge=600
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=32000 Gres=gpu:1 State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$WORK/etc/gres.conf" <<EOF
NodeName=$NODE Name=gpu File=/dev/null
EOF

slurmdbd
started+=("$WORK/pid/slurmdbd.pid")
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null
slurmctld -c
started+=("$WORK/pid/slurmctld.pid")
wait_for 60 slurmctld scontrol ping
# configless: slurmd fetches the config from slurmctld and caches it under /run/slurm/conf, where
# srun finds it inside a job (the jobs' srun runs with SLURM_CONF removed by the plugin).
env -u SLURM_CONF slurmd -N "$NODE" --conf-server "127.0.0.1:$CTLD_PORT"
started+=("$WORK/pid/slurmd.pid")
wait_for 60 "node $NODE idle" sh -c "sinfo -h -n '$NODE' -o %T | grep -qx idle"
log "cluster up ($(slurmctld -V)): $(sinfo -h -o 'partition %P: %D node, %c CPUs, %m MB, %G, %T')"
log "snakemake $("$PY" -m snakemake --version)," \
    "snakemake-executor-plugin-slurm $("$PY" -c 'import importlib.metadata as m; print(m.version("snakemake-executor-plugin-slurm"))')"

# ---- 3. the small demo, through SLURM and locally ---------------------------------------------
# results_dir stays the demo's relative `results` (under the working folder of the runs)
cat >"$WORK/small.yaml" <<EOF
cohort:
  name: slurmtest
  manifest: $WORK/data/manifest.csv
synth:
  out: $WORK/data
  slides: 3
  width: 1536
  height: 1536
train:
  methods: [erm]
  epochs: 2
EOF
CONFIG=(--configfile "$REPO/configs/demo.yaml" "$WORK/small.yaml")
"$PY" -m wsi_scaat synth --config "$REPO/configs/demo.yaml" --config "$WORK/small.yaml" \
    >"$WORK/log/synth.log" 2>&1 || fail "wsi-scaat synth failed (see $WORK/log/synth.log)"

# Both runs use the same working folder, one after the other: outputs hold absolute paths (the
# checkpoint a saliency map was made with), equal only when the runs write to the same place.
# The SLURM run's results and .snakemake (SLURM logs) are moved aside before the local run.
SMK=("$PY" -m snakemake --snakefile "$REPO/Snakefile" --directory "$WORK/run")
mkdir -p "$WORK/run" "$WORK/batched"

# Batches of 2 slides (dry run: the groups Snakemake would submit): 3 slides -> for the one
# model, 2 jobs of saliency + stitch + export (tiling is never grouped).
WSI_SCAAT_SLURM_SLIDES_PER_JOB=2 "$PY" -m snakemake --snakefile "$REPO/Snakefile" --directory "$WORK/batched" \
    -n --profile "$REPO/configs/profiles/slurm" "${CONFIG[@]}" >"$WORK/log/snakemake-batched-dryrun.log" 2>&1 ||
    fail "the dry run with WSI_SCAAT_SLURM_SLIDES_PER_JOB=2 failed (see $WORK/log/snakemake-batched-dryrun.log)"
"$PY" - "$WORK/log/snakemake-batched-dryrun.log" <<'PY' || fail "batched groups"
import collections, re, sys

log = open(sys.argv[1]).read()
groups = collections.Counter(re.findall(r"Group job (\S+) \(jobs", log))
print(f"dry run, 2 slides per job: group jobs {dict(sorted(groups.items()))}")
if groups != {"slides_erm": 2}:
    sys.exit(f"expected 2 group jobs 'slides_erm', got {dict(groups)}")
PY
log "SLURM run: snakemake --profile configs/profiles/slurm (log: $WORK/log/snakemake-slurm.log)"
t=$SECONDS
"${SMK[@]}" --profile "$REPO/configs/profiles/slurm" \
    --slurm-init-seconds-before-status-checks 2 --slurm-keep-successful-logs "${CONFIG[@]}" \
    >"$WORK/log/snakemake-slurm.log" 2>&1 ||
    fail "the SLURM run failed (see $WORK/log/snakemake-slurm.log and $WORK/run/.snakemake/slurm_logs)"
slurm_s=$((SECONDS - t))
log "SLURM run done in ${slurm_s} s"
mv "$WORK/run/results" "$WORK/results-slurm"
mv "$WORK/run/.snakemake" "$WORK/snakemake-slurm"

log "local run: snakemake --cores 2 (log: $WORK/log/snakemake-local.log)"
t=$SECONDS
"${SMK[@]}" --cores 2 "${CONFIG[@]}" >"$WORK/log/snakemake-local.log" 2>&1 ||
    fail "the local run failed (see $WORK/log/snakemake-local.log)"
local_s=$((SECONDS - t))
log "local run done in ${local_s} s"

# ---- 4. checks -------------------------------------------------------------------------------
RUN_ID=$(grep -oE 'SLURM run ID: [0-9a-f-]+' "$WORK/log/snakemake-slurm.log" | head -n 1 | awk '{print $4}')
[[ -n $RUN_ID ]] || fail "no 'SLURM run ID' in the Snakemake log: did the slurm executor run?"
# one row per SLURM job of this run (-X: allocations, not steps): id|comment|state|tres
sacct -X -n -P --name "$RUN_ID" --starttime now-1days --format=JobID,Comment%200,State,AllocTRES%200 \
    >"$WORK/log/sacct.txt"
"$PY" - "$WORK/log/snakemake-slurm.log" "$WORK/log/sacct.txt" "$WORK/log/snakemake-local.log" <<'PY' || fail "sacct check"
import collections, re, sys

def planned_jobs(log):
    """Snakemake's "Job stats" table: the jobs it planned per rule ('all' runs no command, no job)."""
    table = log.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] not in ("all", "total")}

log, local = open(sys.argv[1]).read(), open(sys.argv[3]).read()
rows = [l.split("|") for l in open(sys.argv[2]).read().splitlines() if l]
planned = planned_jobs(log)
if not re.findall(r"(\d+) of (\d+) steps \(100%\) done", log):
    sys.exit("Snakemake did not report 100% done")
GROUPED, LOCAL = ("saliency", "stitch", "export"), ("train_stores",)
slides = planned["saliency"] // planned["train"]  # one group job per explained slide
expected = {r: n for r, n in planned.items() if r not in GROUPED + LOCAL} | {"group slide_*": slides}
per_kind, states, gpu = collections.Counter(), collections.Counter(), collections.Counter()
for jobid, comment, state, tres in rows:
    # the plugin's comment: rule_<rule>[_wildcards_<values>]; for a group job
    # rule_<group id>_<its rules joined by _>, e.g. rule_slide_synth_000_export_saliency_stitch
    rules = [r for r in planned if comment == f"rule_{r}" or comment.startswith(f"rule_{r}_wildcards_")]
    group = re.fullmatch(r"rule_slide_(.+)_export_saliency_stitch(_wildcards_.*)?", comment)
    kind = "group slide_*" if group else (max(rules, key=len) if rules else f"?{comment}")
    per_kind[kind] += 1
    states[state] += 1
    if "gres/gpu=" in tres:
        gpu[kind] += 1
print(f"sacct: {len(rows)} SLURM jobs, {dict(states)}; per rule or group: {dict(sorted(per_kind.items()))};"
      f" with a GPU: {dict(sorted(gpu.items()))}")
print(f"Snakemake planned {sum(planned.values())} jobs: {dict(sorted(planned.items()))}")
errors = []
if states != {"COMPLETED": len(rows)}:
    errors.append(f"not all SLURM jobs COMPLETED: {dict(states)}")
if dict(per_kind) != expected:
    errors.append(f"SLURM jobs {dict(per_kind)} != the grouped submissions expected {expected}")
for kind in ("train", "group slide_*", "evaluate_model"):  # the profile's GPU jobs
    if gpu[kind] != expected.get(kind, 0):
        errors.append(f"{kind}: {gpu[kind]} of {expected.get(kind, 0)} jobs got a GPU (gres/gpu)")
# locally, no groups: every stage of every slide its own job, as many as the SLURM run planned
if planned_jobs(local) != planned or "Group job" in local:
    errors.append(f"the local run planned {planned_jobs(local)} (groups: {'Group job' in local}), not {planned}")
if errors:
    sys.exit("; ".join(errors))
PY

"$PY" "$REPO/tests/cluster/compare_outputs.py" "$WORK/results-slurm/slurmtest" "$WORK/run/results/slurmtest" ||
    fail "the outputs of the SLURM run and the local run differ"

log "PASS: SLURM run ${slurm_s} s, local run ${local_s} s, total $((SECONDS - T0)) s"
