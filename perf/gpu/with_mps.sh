#!/usr/bin/env bash
# Run a command with an NVIDIA MPS control daemon of its own, and stop the daemon after it, however it ends.
#
#   perf/gpu/with_mps.sh COMMAND [ARGS...]
#
# Without MPS the GPU runs one process's kernels at a time: the `llm` and `snac_decoder` stubs take turns
# (time slices), and a SNAC round waits while an engine step runs, though a decode step leaves most of the
# GPU's arithmetic idle. Under MPS their kernels share the GPU at once. The daemon's pipe and log folders
# are a temporary folder's, passed to COMMAND (and the tritonserver it starts, its stubs) through
# CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY; nothing of the GPU's own settings changes.
# Exit status: COMMAND's, or 3 where MPS cannot start (no nvidia-cuda-mps-control, or the daemon fails).
set -uo pipefail

log() { echo "[with_mps] $*" >&2; }

[[ $# -ge 1 ]] || { log "usage: $0 COMMAND [ARGS...]"; exit 2; }
command -v nvidia-cuda-mps-control >/dev/null || { log "no nvidia-cuda-mps-control on this machine: no MPS"; exit 3; }

dir="$(mktemp -d)"
export CUDA_MPS_PIPE_DIRECTORY="$dir/pipe" CUDA_MPS_LOG_DIRECTORY="$dir/log"
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if ! nvidia-cuda-mps-control -d; then
  log "the MPS control daemon did not start"
  exit 3
fi
log "MPS control daemon started (pipes in $CUDA_MPS_PIPE_DIRECTORY)"

stop_daemon() {
  echo quit | nvidia-cuda-mps-control >/dev/null 2>&1 || log "the MPS control daemon did not take 'quit'"
  if [[ -s "$CUDA_MPS_LOG_DIRECTORY/control.log" ]]; then
    log "the daemon's log, last lines:"
    tail -n 5 "$CUDA_MPS_LOG_DIRECTORY/control.log" >&2
  fi
  rm -rf "$dir"
}
child=""
# A step's time limit (timeout) or Ctrl-C: end the command, then the daemon.
trap 'log "stopped"; [[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null; wait "$child"; stop_daemon; exit 143' TERM INT

"$@" &
child=$!
wait "$child"
code=$?
stop_daemon
exit "$code"
