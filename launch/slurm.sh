#!/usr/bin/env bash
# Run `python -m midpo.main` on several GPU nodes under SLURM: one process per node, each seeing
# all of its node's GPUs.
#
# Default: submit a batch job with `sbatch --nodes=N --ntasks-per-node=1 ... --wrap='srun ...'`.
# With --srun (inside an allocation from salloc, or in your own batch script): run the srun
# step directly. Either way, every task runs a per-task command that exports, from SLURM's
# variables as that task sees them,
#   JAX_COORDINATOR_ADDRESS  first host of $SLURM_JOB_NODELIST (`scontrol show hostnames`):PORT
#   JAX_NUM_PROCESSES        $SLURM_NTASKS
#   JAX_PROCESS_ID           $SLURM_PROCID
# then activates the virtualenv and execs `python -m midpo.main --config=... --workdir=...`.
# Each command is printed as `+ COMMAND` before it runs; --dry-run prints and runs nothing.
# The repository and the virtualenv must be on a filesystem that every node sees.
# See launch/README.md for examples.
set -euo pipefail

PROG=launch/slurm.sh

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh --nodes N --config CONFIG --workdir WORKDIR [options] [-- CONFIG_OVERRIDES...]

Submit a SLURM job that runs `python -m midpo.main --config=CONFIG --workdir=WORKDIR
CONFIG_OVERRIDES...` as one process per node (JAX uses all GPUs of its node), with
jax.distributed configured through JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.

Required:
  --nodes N               number of nodes (= number of JAX processes)
  --config CONFIG         e.g. configs/dpo.py (relative to the repository root, or absolute)
  --workdir WORKDIR       a directory every node sees (shared filesystem); relative paths are
                          relative to the repository root

Options:
  --gpus-per-node G       request G GPUs per node (sbatch and srun --gpus-per-node)
  --partition P           sbatch --partition
  --account A             sbatch --account
  --time T                sbatch --time, e.g. 24:00:00
  --job-name NAME         sbatch --job-name (default: midpo)
  --sbatch-arg ARG        any other sbatch option, e.g. --sbatch-arg=--qos=high; repeatable
  --port PORT             coordinator port (default: 20000 + SLURM_JOB_ID % 20000, so that
                          jobs sharing a node do not collide)
  --venv DIR              virtualenv to activate on every node (default: REPO/.venv)
  --srun                  do not submit: run the srun step now (inside an allocation)
  --dry-run               print the commands, one per line prefixed with '+ ', run nothing
                          (also DRY_RUN=1)
  -h, --help              this message

Everything after `--`, and any argument of the form --config.KEY=VALUE, is passed to
midpo.main unchanged (quoted for the shell). The job also asks SLURM to send SIGTERM 300 s
before the time limit (--signal=TERM@300), so that midpo can checkpoint; override it with
--sbatch-arg=--signal=....
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NODES=""
CONFIG=""
WORKDIR=""
GPUS_PER_NODE=""
PARTITION=""
ACCOUNT=""
TIME=""
JOB_NAME=midpo
PORT=""
VENV=""
SRUN_ONLY=0
SBATCH_ARGS=()
OVERRIDES=()

while [[ $# -gt 0 ]]; do
  SHIFT=1
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --srun) SRUN_ONLY=1 ;;
    --nodes | --nodes=*) optval --nodes "$@"; NODES=$VALUE ;;
    --config | --config=*) optval --config "$@"; CONFIG=$VALUE ;;
    --workdir | --workdir=*) optval --workdir "$@"; WORKDIR=$VALUE ;;
    --gpus-per-node | --gpus-per-node=*) optval --gpus-per-node "$@"; GPUS_PER_NODE=$VALUE ;;
    --partition | --partition=*) optval --partition "$@"; PARTITION=$VALUE ;;
    --account | --account=*) optval --account "$@"; ACCOUNT=$VALUE ;;
    --time | --time=*) optval --time "$@"; TIME=$VALUE ;;
    --job-name | --job-name=*) optval --job-name "$@"; JOB_NAME=$VALUE ;;
    --sbatch-arg | --sbatch-arg=*) optval --sbatch-arg "$@"; SBATCH_ARGS+=("$VALUE") ;;
    --port | --port=*) optval --port "$@"; PORT=$VALUE ;;
    --venv | --venv=*) optval --venv "$@"; VENV=$VALUE ;;
    --config.*) OVERRIDES+=("$1") ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) die "unknown argument: $1 (pass config overrides after --)" ;;
  esac
  shift "$SHIFT"
done

[[ -n $NODES ]] || die "missing required argument --nodes"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ -n $CONFIG ]] || die "missing required argument --config"
[[ -n $WORKDIR ]] || die "missing required argument --workdir"
[[ -z $GPUS_PER_NODE || $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
  die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"
[[ -z $PORT || ($PORT =~ ^[1-9][0-9]*$ && $PORT -le 65535) ]] ||
  die "--port must be a port number, got '$PORT'"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -n $VENV ]] || VENV=$REPO_ROOT/.venv
[[ $VENV == /* ]] || VENV=$PWD/$VENV

# The per-task command: SLURM_* are expanded by each task's own shell, not here.
if [[ -n $PORT ]]; then
  port_expr=$PORT
else
  port_expr='$((20000 + ${SLURM_JOB_ID:-0} % 20000))'
fi
MAIN=(python -m midpo.main --config="$CONFIG" --workdir="$WORKDIR")
MAIN+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")
task='set -eu; '
task+='host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1); '
task+='[ -n "$host" ] || { echo "'"$PROG"': no host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 1; }; '
task+="export JAX_COORDINATOR_ADDRESS=\"\$host:$port_expr\"; "
task+='export JAX_NUM_PROCESSES="$SLURM_NTASKS"; '
task+='export JAX_PROCESS_ID="$SLURM_PROCID"; '
task+='export PYTHONUNBUFFERED=1; '
task+="cd $(q "$REPO_ROOT"); "
task+=". $(q "$VENV/bin/activate"); "
task+="exec $(qjoin "${MAIN[@]}")"

SRUN=(srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
[[ -n $GPUS_PER_NODE ]] && SRUN+=(--gpus-per-node="$GPUS_PER_NODE")
SRUN+=(bash -c "$task")

if [[ $SRUN_ONLY == 1 ]]; then
  cd "$REPO_ROOT"
  run "${SRUN[@]}"
  exit 0
fi

SBATCH=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node=1)
[[ -n $GPUS_PER_NODE ]] && SBATCH+=(--gpus-per-node="$GPUS_PER_NODE")
[[ -n $PARTITION ]] && SBATCH+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && SBATCH+=(--account="$ACCOUNT")
[[ -n $TIME ]] && SBATCH+=(--time="$TIME")
SBATCH+=(--chdir="$REPO_ROOT" --signal=TERM@300)
SBATCH+=("${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}")
SBATCH+=(--wrap="$(qjoin "${SRUN[@]}")")
run "${SBATCH[@]}"
