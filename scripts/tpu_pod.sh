#!/usr/bin/env bash
# Runs visionr1_jax on a Cloud TPU VM slice: create it, copy the code to every worker, install
# requirements-tpu.txt on every worker, start the same command on all of them, tail the logs,
# and start again after a preemption (the run resumes from its newest checkpoint in WORKDIR).
#
#   export TPU_NAME=vr1 ZONE=us-central2-b ACCELERATOR=v4-64
#   export CONFIG=configs/tpu_v4_64.py WORKDIR=gs://BUCKET/run
#   export ARGS="--config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct \
#                --config.data.data_dir=gs://BUCKET/tensorflow_datasets"
#   scripts/tpu_pod.sh up        # create + copy + install + run
#   scripts/tpu_pod.sh logs      # host 0's log (the progress bar and metrics)
#   scripts/tpu_pod.sh watch     # keep it running: re-create and resume after preemption
#   scripts/tpu_pod.sh down      # delete the slice (WORKDIR keeps checkpoints and metrics)
#
# Steps one by one: create, copy, install, run, stop, status. Optional: PROJECT, RUNTIME
# (default tpu-ubuntu2204-base), SPOT=1 (spot capacity), POLL (seconds between watch checks,
# default 300). DRY_RUN=1 prints the gcloud commands instead of running them.
# Every worker runs `python -m visionr1_jax.main`: jax.distributed finds its peers on a
# Cloud TPU VM by itself (TPU_WORKER_HOSTNAMES), each host loads its own shard of the data and
# orbax writes the checkpoints to WORKDIR (gs:// on a pod) from every host.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-64}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/tpu_v4_64.py}
WORKDIR=${WORKDIR:-}
ARGS=${ARGS:-}
POLL=${POLL:-300}
REMOTE_DIR=visionr1_jax
LOG=visionr1_run.log

gc() {
  local cmd=(gcloud compute tpus tpu-vm "$@" --zone="$ZONE")
  [[ -n "${PROJECT:-}" ]] && cmd+=(--project="$PROJECT")
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
}

on_all() { gc ssh "$TPU_NAME" --worker=all --command="$1"; }

create() {
  local extra=()
  [[ -n "${SPOT:-}" ]] && extra+=(--spot)
  gc create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
}

copy() {  # the committed tree (git archive), the same on every worker
  local tarball
  tarball=$(mktemp --suffix=.tar.gz)
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$tarball" HEAD
  gc scp "$tarball" "$TPU_NAME:~/visionr1_jax.tar.gz" --worker=all
  on_all "rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf visionr1_jax.tar.gz -C $REMOTE_DIR"
  rm -f "$tarball"
}

install() {
  on_all "cd $REMOTE_DIR && python3 -m venv .venv-tpu && .venv-tpu/bin/pip install -q -U pip \
    && .venv-tpu/bin/pip install -q -r requirements-tpu.txt && .venv-tpu/bin/pip install -q --no-deps -e ."
}

run() {
  : "${WORKDIR:?set WORKDIR (gs://BUCKET/run: checkpoints and metrics outlive the slice)}"
  on_all "cd $REMOTE_DIR && nohup .venv-tpu/bin/python -m visionr1_jax.main \
    --config=$CONFIG --workdir=$WORKDIR $ARGS > ~/$LOG 2>&1 < /dev/null &"
}

stop() { on_all "pkill -TERM -f visionr1_jax.main || true"; }  # SIGTERM: saves, then exits

logs() { gc ssh "$TPU_NAME" --worker=0 --command="tail -n 200 -f ~/$LOG"; }

status() {  # READY / PREEMPTED / ... (empty: no such slice)
  if [[ -n "${DRY_RUN:-}" ]]; then gc describe "$TPU_NAME" --format='value(state)'; return; fi
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    --format='value(state)' 2>/dev/null || true
}

running() {  # the job still runs on worker 0
  gc ssh "$TPU_NAME" --worker=0 --command="pgrep -f visionr1_jax.main" > /dev/null 2>&1
}

finished() {  # the job exited 0 (the log's last line is the run's summary)
  gc ssh "$TPU_NAME" --worker=0 --command="grep -q 'run finished' ~/$LOG" > /dev/null 2>&1
}

up() { create; copy; install; run; }

watch() {
  while true; do
    state=$(status)
    if [[ "$state" != "READY" ]]; then
      echo "$(date -u +%FT%TZ) slice state '${state:-none}': re-creating and resuming"
      [[ -n "$state" ]] && gc delete "$TPU_NAME" --quiet
      up
    elif ! running; then
      if finished; then echo "run finished"; return 0; fi
      echo "$(date -u +%FT%TZ) job not running on worker 0: restarting (it resumes)"
      stop; run
    fi
    [[ -n "${DRY_RUN:-}" ]] && return 0
    sleep "$POLL"
  done
}

down() { gc delete "$TPU_NAME" --quiet; }

case "${1:-}" in
  up|create|copy|install|run|stop|logs|status|watch|down) "$1" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
