#!/usr/bin/env bash
# The launch the recipes share (sourced by pretrain_webvid.sh, finetune_msrvtt.sh, only_test_msrvtt.sh; not run).
#   launcher_paths VAR...                    make the named variables absolute paths, relative to the folder the
#                                            recipe was started in (the recipes never change directory either)
#   launcher_command ENTRY NNODES PORT       set the array LAUNCH: the command that starts ENTRY (a script in the
#                                            repository) on every process, before its flags; NNODES and PORT are
#                                            the recipe's defaults
#   launcher_run CMD...                      run CMD, or print it with DRY_RUN=1
# Environment: LAUNCHER=torchrun (default) or srun (one task per GPU, as the sbatch files start it: the tasks
# read rank, MASTER_ADDR and port from SLURM). torchrun: NNODES GPUS_PER_NODE=8 NODE_RANK=0 MASTER_ADDR (needed
# with more than one node) MASTER_PORT (default: from SLURM_JOB_ID when there is one, as distributed.port_for_job,
# else the recipe's). PY=/path/to/python, else the repository's .venv (made by scripts/setup_env.sh; torchrun
# mode sets it up on first use, srun mode only uses it). DRY_RUN=1 prints the command. SIMVTP_MALLOC: see
# fast_malloc.sh (tcmalloc is preloaded when installed).
LAUNCHER_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$LAUNCHER_REPO/scripts/fast_malloc.sh"  # launcher_run preloads tcmalloc when it is installed

launcher_fail() {
  echo "error: $*" >&2
  exit 2
}

launcher_paths() {
  local var value
  for var in "$@"; do
    value="${!var:-}"
    case "$value" in
      "" | /*) ;;
      *) printf -v "$var" '%s/%s' "$PWD" "${value#./}" ;;
    esac
  done
}

launcher_port() {  # the rendezvous port: MASTER_PORT, else one derived from the job id, else the default
  local default="$1" digits="${SLURM_JOB_ID:-}"
  digits="${digits//[!0-9]/}"
  if [ -n "${MASTER_PORT:-}" ]; then
    echo "$MASTER_PORT"
  elif [ -n "$digits" ]; then
    echo $(( 10000 + 10#$digits % 20000 ))
  else
    echo "$default"
  fi
}

launcher_python() {
  if [ -n "${PY:-}" ]; then
    return
  fi
  if [ -z "${DRY_RUN:-}" ] && [ "${LAUNCHER:-torchrun}" = torchrun ]; then
    source "$LAUNCHER_REPO/scripts/setup_env.sh" requirements.txt  # sets PY, the .venv's python
  fi
  PY="${PY:-$LAUNCHER_REPO/.venv/bin/python}"
  if [ -z "${DRY_RUN:-}" ] && [ ! -x "$PY" ]; then
    launcher_fail "$PY not found: run \`bash scripts/setup_env.sh\` once (on a login node, before submitting), or set PY=/path/to/python"
  fi
}

launcher_command() {
  local entry="$LAUNCHER_REPO/$1" nnodes="${NNODES:-$2}" port
  port="$(launcher_port "$3")"
  launcher_python
  case "${LAUNCHER:-torchrun}" in
    torchrun)
      if [ "$nnodes" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
        launcher_fail "NNODES=$nnodes needs MASTER_ADDR, the host name of the node with NODE_RANK=0 (every node must reach it): run NODE_RANK=i MASTER_ADDR=node0 bash scripts/$(basename "$0") ... on each node; under SLURM submit scripts/slurm_pretrain.sbatch instead"
      fi
      LAUNCH=("$PY" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "${GPUS_PER_NODE:-8}"
              --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$port"
              "$entry") ;;
    srun)  # srun no longer passes the batch job's --cpus-per-task on to its tasks (Slurm 22.05+): say it again
      LAUNCH=(srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} "$PY" "$entry") ;;
    *)
      launcher_fail "LAUNCHER=$LAUNCHER: use torchrun or srun" ;;
  esac
}

launcher_run() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$@"
    echo
    exit 0
  fi
  fast_malloc
  exec "$@"
}
