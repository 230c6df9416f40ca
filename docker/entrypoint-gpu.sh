#!/bin/sh
# Entry point of the GPU image: build the TensorRT-LLM engine when $ORPHEUS_ENGINE_DIR lacks
# one for these options, this GPU and this TensorRT-LLM, then render the repository and serve.
# Arguments starting with "-" go to render_gpu_repository.py (ports, KV cache share, ...);
# $ORPHEUS_BUILD_ARGS goes to build_trtllm.py. Any other command (bash, orpheus-triton say, ...)
# runs as is.
set -eu

home="${ORPHEUS_HOME:-/opt/orpheus-triton}"
models="${ORPHEUS_MODELS:-/models}"
engine="${ORPHEUS_ENGINE_DIR:-/engines/orpheus-3b}"
python="${ORPHEUS_PYTHON:-python3}"

case "${1:-}" in
    "" | -*) ;;
    *) exec "$@" ;;
esac

# Serving goes through the base image's own entry point first (its banner, driver check and CUDA
# forward-compatibility setup), which then runs this one again with the same arguments. Other commands
# run as they are: a banner on their stdout would corrupt output such as `say -o -`'s raw audio.
nvidia_entrypoint="${ORPHEUS_NVIDIA_ENTRYPOINT:-/opt/nvidia/nvidia_entrypoint.sh}"
if [ -z "${ORPHEUS_NVIDIA_ENTRYPOINT_DONE:-}" ] && [ -x "$nvidia_entrypoint" ]; then
    export ORPHEUS_NVIDIA_ENTRYPOINT_DONE=1
    exec "$nvidia_entrypoint" "$0" "$@"
fi

if [ ! -f "$models/llm/config.json" ]; then
    echo "[orpheus-gpu] no model set at $models: mount one with llm/ and snac/ there" \
        "(orpheus-triton download DIR --token HF_TOKEN writes one)" >&2
    exit 2
fi

# The build runs for minutes with this shell as the container's first process, which ignores SIGTERM
# unless it handles it: a stop (docker stop) is passed on to the build, which ends through its cleanup
# (its temporary checkpoint, several GB on the engine volume, removed) instead of being killed later.
# ORPHEUS_BUILD_ARGS is a list of flags: split on blanks on purpose.
# shellcheck disable=SC2086
"$python" "$home/build_engines/build_trtllm.py" --llm-dir "$models/llm" --output-dir "$engine" \
    --skip-if-built ${ORPHEUS_BUILD_ARGS:-} &
build=$!
trap 'kill -TERM "$build" 2>/dev/null || true' TERM INT HUP
status=0
wait "$build" || status=$?
while kill -0 "$build" 2>/dev/null; do  # a signal ended the wait: wait for the build's own end
    status=0
    wait "$build" || status=$?
done
trap - TERM INT HUP
if [ "$status" -ne 0 ]; then
    exit "$status"
fi
exec "$python" "$home/build_engines/render_gpu_repository.py" --models "$models" --engine-dir "$engine" \
    --serve "$@"
