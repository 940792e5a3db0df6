#!/usr/bin/env bash
# Run `python -m midpo.main` on every worker of a Cloud TPU VM (single host or pod slice).
#
# Steps (each printed as `+ COMMAND` before it runs; --dry-run prints them and runs nothing):
#   1. create the TPU VM, or reuse it when one of that name exists and is READY;
#   2. copy the code (setup.py, README.md, midpo/, configs/ and any --copy PATH) to every worker;
#   3. install it on every worker: `PY -m venv .venv && . .venv/bin/activate && pip install -e .`
#      (`.[gcs]` for a gs:// workdir),
#      then `pip install "jax[tpu]==<the jax version pinned in setup.py>"` (the TPU runtime);
#   4. run the same `python -m midpo.main --config=... --workdir=... [overrides]` on all workers.
# JAX finds the other workers of a pod slice by itself; nothing is exported for it.
# See launch/README.md for examples.
set -euo pipefail

PROG=launch/tpu_vm.sh

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type TYPE --version RUNTIME \
         --config CONFIG --workdir WORKDIR [options] [-- CONFIG_OVERRIDES...]

Create (or reuse) a Cloud TPU VM, copy midpo to every worker, install it there, and run
`python -m midpo.main --config=CONFIG --workdir=WORKDIR CONFIG_OVERRIDES...` on all workers.

Required (flag, or the environment variable in brackets):
  --name NAME               TPU VM name                                  [TPU_NAME]
  --zone ZONE               e.g. us-central2-b                           [TPU_ZONE]
  --accelerator-type TYPE   e.g. v4-32, v5litepod-16                     [TPU_ACCELERATOR_TYPE]
                            (not needed with --no-create)
  --version RUNTIME         TPU software version, e.g. tpu-ubuntu2204-base
                            (not needed with --no-create)                [TPU_RUNTIME_VERSION]
  --config CONFIG           config file inside the copied tree, e.g. configs/dpo.py
                            or configs/dpo.py:full (the get_config argument)
  --workdir WORKDIR         a directory every worker sees (a shared mount on pod slices: every worker must see the
                            same directory) or a path on each worker (relative to --remote-dir)

Options:
  --project PROJECT         GCP project (default: gcloud's configured project) [TPU_PROJECT]
  --spot                    create a Spot TPU VM
  --preemptible             create a preemptible TPU VM
  --no-create               never create: fail unless a READY TPU VM of that name exists
  --skip-copy               do not copy the code (it is already on the workers)
  --skip-install            do not create the virtualenv / pip install (already done)
  --copy PATH               also copy PATH (relative to the repository root); repeatable
  --remote-dir DIR          directory on each worker, relative to the home directory
                            (default: midpo)
  --python PY               Python 3.11 interpreter on the workers (default: python3.11; it is
                            installed with apt-get when missing)
  --jax-extra EXTRA         pip extra of jax for the runtime (default: tpu; '' to skip)
  --background              start the run with nohup and return; output goes to
                            REMOTE_DIR/LOG_FILE on each worker
  --log-file FILE           log file for --background (default: midpo.log)
  --dry-run                 print the commands, one per line prefixed with '+ ', run nothing
                            (also DRY_RUN=1)
  -h, --help                this message

Everything after `--`, and any argument of the form --config.KEY=VALUE, is passed to
midpo.main unchanged (quoted for the remote shell).
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

note() {
  if is_dry; then printf '# %s\n' "$1"; else printf '# %s\n' "$1" >&2; fi
}

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-}
PROJECT=${TPU_PROJECT:-}
CONFIG=""
WORKDIR=""
SPOT=0
PREEMPTIBLE=0
NO_CREATE=0
SKIP_COPY=0
SKIP_INSTALL=0
REMOTE_DIR=midpo
PY=python3.11
JAX_EXTRA=tpu
BACKGROUND=0
LOG_FILE=midpo.log
EXTRA_COPY=()
OVERRIDES=()

while [[ $# -gt 0 ]]; do
  SHIFT=1
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --no-create) NO_CREATE=1 ;;
    --skip-copy) SKIP_COPY=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --background) BACKGROUND=1 ;;
    --name | --name=*) optval --name "$@"; NAME=$VALUE ;;
    --zone | --zone=*) optval --zone "$@"; ZONE=$VALUE ;;
    --accelerator-type | --accelerator-type=*) optval --accelerator-type "$@"; ACCELERATOR_TYPE=$VALUE ;;
    --version | --version=*) optval --version "$@"; RUNTIME_VERSION=$VALUE ;;
    --project | --project=*) optval --project "$@"; PROJECT=$VALUE ;;
    --config | --config=*) optval --config "$@"; CONFIG=$VALUE ;;
    --workdir | --workdir=*) optval --workdir "$@"; WORKDIR=$VALUE ;;
    --copy | --copy=*) optval --copy "$@"; EXTRA_COPY+=("$VALUE") ;;
    --remote-dir | --remote-dir=*) optval --remote-dir "$@"; REMOTE_DIR=$VALUE ;;
    --python | --python=*) optval --python "$@"; PY=$VALUE ;;
    --jax-extra | --jax-extra=*) optval --jax-extra "$@"; JAX_EXTRA=$VALUE ;;
    --log-file | --log-file=*) optval --log-file "$@"; LOG_FILE=$VALUE ;;
    --config.*) OVERRIDES+=("$1") ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) die "unknown argument: $1 (pass config overrides after --)" ;;
  esac
  shift "$SHIFT"
done

[[ -n $NAME ]] || die "missing required argument --name (or TPU_NAME)"
[[ -n $ZONE ]] || die "missing required argument --zone (or TPU_ZONE)"
if [[ $NO_CREATE == 0 ]]; then
  [[ -n $ACCELERATOR_TYPE ]] || die "missing required argument --accelerator-type (or TPU_ACCELERATOR_TYPE)"
  [[ -n $RUNTIME_VERSION ]] || die "missing required argument --version (or TPU_RUNTIME_VERSION)"
fi
[[ -n $CONFIG ]] || die "missing required argument --config"
[[ -n $WORKDIR ]] || die "missing required argument --workdir"
[[ $SPOT == 1 && $PREEMPTIBLE == 1 ]] && die "--spot and --preemptible exclude each other"
[[ $REMOTE_DIR != /* && $REMOTE_DIR != *..* && -n $REMOTE_DIR ]] ||
  die "--remote-dir must be a path relative to the home directory, without '..'"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

COPY=(setup.py README.md midpo configs)
COPY+=("${EXTRA_COPY[@]+"${EXTRA_COPY[@]}"}")
for path in "${COPY[@]}"; do
  [[ -e $path ]] || die "--copy: $path does not exist under the repository root"
  [[ $path != /* && $path != *..* ]] || die "--copy: $path must be relative to the repository root"
done
# The config file must reach the workers: it has to lie inside a copied path.
config_file=${CONFIG%%:*}
config_copied=0
for path in "${COPY[@]}"; do
  path=${path%/}
  if [[ $config_file == "$path" || $config_file == "$path"/* ]]; then config_copied=1; fi
done
[[ $config_copied == 1 ]] ||
  die "--config: $config_file is not inside a copied path (${COPY[*]}); add --copy PATH"

JAX_VERSION=$(sed -n 's/^[[:space:]]*"jax==\([^"]*\)".*/\1/p' setup.py | head -n 1)
[[ -n $JAX_EXTRA && -z $JAX_VERSION ]] && die "could not read the jax version pinned in setup.py"

# A gs:// workdir is read and written through gcsfs: the gcs extra.
PACKAGE=.
[[ $WORKDIR == gs://* ]] && PACKAGE=".[gcs]"

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n $PROJECT ]] && GCLOUD_FLAGS+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# 1. Create or reuse.
if is_dry; then
  run "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)'
fi
CREATE=("${TPU[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$ACCELERATOR_TYPE"
  --version="$RUNTIME_VERSION")
[[ $SPOT == 1 ]] && CREATE+=(--spot)
[[ $PREEMPTIBLE == 1 ]] && CREATE+=(--preemptible)
if is_dry; then
  if [[ $NO_CREATE == 1 ]]; then
    note "--no-create: the run stops here unless the state above is READY"
  else
    note "only when the describe above fails (no TPU VM of that name); READY: reused; else: stop"
    run "${CREATE[@]}"
  fi
else
  state=$("${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)' 2>/dev/null) ||
    state=""
  if [[ -z $state ]]; then
    [[ $NO_CREATE == 0 ]] || die "no TPU VM named $NAME in zone $ZONE (and --no-create was given)"
    run "${CREATE[@]}"
  elif [[ $state == READY ]]; then
    note "reusing TPU VM $NAME (READY)"
  else
    die "TPU VM $NAME exists in state $state; wait until it is READY, or delete it with:
  gcloud compute tpus tpu-vm delete $(qjoin "$NAME" "${GCLOUD_FLAGS[@]}")"
  fi
fi

SSH=("${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all)
RD=$(q "$REMOTE_DIR")

# 2. Copy: remove the previous copy of the code (not the virtualenv, not local workdirs).
if [[ $SKIP_COPY == 0 ]]; then
  clean=()
  for path in "${COPY[@]}"; do clean+=("$REMOTE_DIR/${path%/}"); done
  run "${SSH[@]}" --command="mkdir -p $RD && rm -rf $(qjoin "${clean[@]}")"
  run "${TPU[@]}" scp --recurse "${COPY[@]}" "$NAME:$REMOTE_DIR" "${GCLOUD_FLAGS[@]}" --worker=all
fi

# 3. Install (the README's command, without the test extra) and the TPU runtime of jax.
if [[ $SKIP_INSTALL == 0 ]]; then
  P=$(q "$PY")
  install="cd $RD && if ! command -v $P >/dev/null 2>&1; then sudo apt-get update -qq"
  install+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $P $(q "$PY-venv"); fi"
  install+=" && $P -m venv .venv && . .venv/bin/activate && pip install -e $(q "$PACKAGE")"
  [[ -n $JAX_EXTRA ]] && install+=" && pip install $(q "jax[$JAX_EXTRA]==$JAX_VERSION")"
  run "${SSH[@]}" --command="$install"
fi

# 4. Run the same command on every worker.
MAIN=(python -m midpo.main --config="$CONFIG" --workdir="$WORKDIR")
MAIN+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")
main_cmd=$(qjoin "${MAIN[@]}")
if [[ $BACKGROUND == 1 ]]; then
  remote="cd $RD && . .venv/bin/activate && nohup $main_cmd > $(q "$LOG_FILE") 2>&1 < /dev/null &"
else
  remote="cd $RD && . .venv/bin/activate && $main_cmd"
fi
run "${SSH[@]}" --command="$remote"
if [[ $BACKGROUND == 1 ]]; then
  note "follow worker 0 with: $(qjoin "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0 \
    --command="tail -f $REMOTE_DIR/$LOG_FILE")"
fi
