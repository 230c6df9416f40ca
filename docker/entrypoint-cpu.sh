#!/bin/sh
# Entry point of the CPU image: arguments are an `orpheus-triton` command (default: serve).
# `serve` and `demo` use the model set at $ORPHEUS_MODELS (default /models) when one is
# mounted there and no --models is given; a folder there that holds files but no model set is refused
# (exit 2: a wrong mount); with it empty (compose's default volume, no mount), the demo model set.
# Anything that is not an orpheus-triton command (bash, python, ...) runs as is.
set -eu

models="${ORPHEUS_MODELS:-/models}"

if [ "$#" -eq 0 ]; then
    set -- serve
fi
case "$1" in
    -*) set -- serve "$@" ;;
    serve | demo | say | download) ;;
    *) exec "$@" ;;
esac

case "$1" in
    serve | demo)
        case " $* " in
            *" --models "* | *" --models="*) ;;
            *)
                if [ -f "$models/llm/config.json" ]; then
                    set -- "$@" --models "$models"
                elif [ -n "${ORPHEUS_MODEL_DIR:-}" ]; then  # compose: a model set was asked for
                    echo "[orpheus-entrypoint] ORPHEUS_MODEL_DIR=$ORPHEUS_MODEL_DIR is mounted at $models but" \
                        "$models/llm/config.json cannot be read: a host folder that does not exist is created" \
                        "empty, a relative path is taken from docker/ (the compose file's folder), and uid" \
                        "$(id -u) must be able to read it" >&2
                    exit 2
                elif [ -e "$models" ] && ! { [ -r "$models" ] && [ -x "$models" ]; }; then
                    echo "[orpheus-entrypoint] $models cannot be read by uid $(id -u): make the mounted" \
                        "model set readable to it" >&2
                    exit 2
                elif [ -n "$(ls -A "$models" | grep -vx 'lost+found')" ]; then  # `docker run -v WRONG:/models`
                    echo "[orpheus-entrypoint] $models holds files but no model set" \
                        "($models/llm/config.json cannot be read): mount the folder that holds llm/ and snac/" \
                        "(see \`orpheus-triton download\`), readable by uid $(id -u); with $models empty the" \
                        "demo set is served" >&2
                    exit 2
                else
                    echo "[orpheus-entrypoint] no model set at $models (llm/config.json): serving the demo set" >&2
                fi
                ;;
        esac
        ;;
esac
exec orpheus-triton "$@"
