#!/usr/bin/env bash
# Install Triton's perf_analyzer for CPU machines and print the path of a working binary.
#
#   perf/install_perf_analyzer.sh            # installs into perf/.tools/ (or $PERF_TOOLS_DIR)
#   PA=$(perf/install_perf_analyzer.sh | tail -n 1)
#
# * A perf_analyzer already on PATH (the Triton NGC "-py3-sdk" image) is reused as it is.
# * Otherwise the binary comes from the manylinux wheel of tritonclient 2.47.0 (the last
#   release whose wheel ships it), installed into its own venv so the project's
#   environment keeps its newer tritonclient.
# * Its two shared libraries that a plain Debian/Ubuntu machine lacks:
#   libb64.so.0d (Debian package libb64-0d: apt-get as root, else unpacked from
#   `apt-get download` into the tools folder) and libcudart.so.12 (from the
#   nvidia-cuda-runtime-cu12 wheel; loaded, never used, for CPU-only runs).
# The last line printed is the path of a wrapper script that sets LD_LIBRARY_PATH and
# runs the binary; it is verified with `--help` before it is printed.
#
# Offline (a GPU machine without network): PERF_ANALYZER_WHEELS=DIR installs from DIR,
# which holds the two wheels and libb64-0d_*.deb (perf/gpu/run_on_gpu.sh fetch puts them there),
# or PERF_ANALYZER_BUNDLE=FILE unpacks FILE, a tar.xz of libexec/perf_analyzer and lib/ with the
# two libraries (4.6 MB: perf/gpu/run_on_gpu.sh pack makes it; no pip, no venv).
set -euo pipefail

if (($#)); then  # it takes no arguments: --help (or anything else) prints the comment above and does nothing
  sed -n '2,/^set -euo/{/^set -euo/!s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
  [[ "$1" == "-h" || "$1" == "--help" ]] && exit 0
  echo "[install_perf_analyzer] unexpected argument: $1 (settings come from the environment, above)" >&2
  exit 2
fi

TRITONCLIENT_VERSION=2.47.0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS="${PERF_TOOLS_DIR:-$HERE/.tools}"
PYTHON="${PYTHON:-python3}"

log() { echo "[install_perf_analyzer] $*" >&2; }

works() {  # perf_analyzer prints its usage and exits non-zero on --help; a loader error says "error while loading"
  local out
  out="$("$1" --help 2>&1 || true)"
  grep -q -- "--concurrency-range" <<<"$out"
}

if [[ -z "${PERF_ANALYZER_FORCE_INSTALL:-}" ]] && command -v perf_analyzer >/dev/null 2>&1; then
  found="$(command -v perf_analyzer)"
  if works "$found"; then
    log "reusing perf_analyzer on PATH"
    echo "$found"
    exit 0
  fi
  log "$found is on PATH but does not run; installing a private copy"
fi

WRAPPER="$TOOLS/bin/perf_analyzer"
if [[ -x "$WRAPPER" ]] && works "$WRAPPER"; then
  log "already installed in $TOOLS"
  echo "$WRAPPER"
  exit 0
fi

write_wrapper() {  # write_wrapper BINARY LIBRARY_PATH: $WRAPPER runs BINARY with LIBRARY_PATH, checked by --help
  mkdir -p "$TOOLS/bin"
  cat >"$WRAPPER" <<WRAP
#!/usr/bin/env bash
# perf_analyzer from tritonclient $TRITONCLIENT_VERSION, with the libraries it needs on CPU machines.
export LD_LIBRARY_PATH="$2\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$1" "\$@"
WRAP
  chmod +x "$WRAPPER"
  if ! works "$WRAPPER"; then
    log "installed, but $WRAPPER --help fails:"
    "$WRAPPER" --help 2>&1 | head -n 5 >&2 || true
    exit 1
  fi
  log "perf_analyzer ready"
  echo "$WRAPPER"
}

if [[ -n "${PERF_ANALYZER_BUNDLE:-}" ]]; then
  [[ -f "$PERF_ANALYZER_BUNDLE" ]] || { log "PERF_ANALYZER_BUNDLE=$PERF_ANALYZER_BUNDLE is not a file"; exit 1; }
  log "unpacking $PERF_ANALYZER_BUNDLE into $TOOLS"
  mkdir -p "$TOOLS"
  tar -C "$TOOLS" -xJf "$PERF_ANALYZER_BUNDLE" libexec/perf_analyzer lib
  write_wrapper "$TOOLS/libexec/perf_analyzer" "$TOOLS/lib"
  exit 0
fi

if [[ "$(uname -m)" != "x86_64" ]]; then
  log "the tritonclient wheel's perf_analyzer is built for x86_64 only; use the Triton SDK image on $(uname -m)"
  exit 1
fi

mkdir -p "$TOOLS/bin" "$TOOLS/lib"
if [[ ! -x "$TOOLS/venv/bin/python" ]]; then
  log "creating $TOOLS/venv"
  if ! "$PYTHON" -m venv "$TOOLS/venv" >/dev/null 2>&1; then
    # No ensurepip (Debian without python3-venv): a venv without pip, then pip from this interpreter.
    rm -rf "$TOOLS/venv"
    "$PYTHON" -m venv --without-pip --system-site-packages "$TOOLS/venv"
  fi
fi
log "installing tritonclient==$TRITONCLIENT_VERSION (for its perf_analyzer) and nvidia-cuda-runtime-cu12"
offline=()
if [[ -n "${PERF_ANALYZER_WHEELS:-}" ]]; then
  offline=(--no-index --find-links "$PERF_ANALYZER_WHEELS" --no-deps)
fi
"$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: "${offline[@]}" \
  "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12>=12,<13"
BINARY="$TOOLS/venv/bin/perf_analyzer"
[[ -x "$BINARY" ]] || { log "the tritonclient wheel did not install $BINARY"; exit 1; }
CUDART_DIR="$("$TOOLS/venv/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia.cuda_runtime")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "lib")
PY
)"
[[ -e "$CUDART_DIR/libcudart.so.12" ]] || { log "libcudart.so.12 not found in $CUDART_DIR"; exit 1; }

# libb64: system-wide if we can, else a private copy of the Debian package's library.
if ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
  log "libb64.so.0d already installed"
elif [[ -e "$TOOLS/lib/libb64.so.0d" ]]; then
  log "using private libb64.so.0d in $TOOLS/lib"
elif [[ -n "${PERF_ANALYZER_WHEELS:-}" ]] && compgen -G "$PERF_ANALYZER_WHEELS/libb64-0d_*.deb" >/dev/null; then
  log "unpacking libb64.so.0d from $PERF_ANALYZER_WHEELS into $TOOLS/lib"
  scratch="$(mktemp -d)"
  dpkg-deb -x "$(compgen -G "$PERF_ANALYZER_WHEELS/libb64-0d_*.deb" | head -n 1)" "$scratch"
  find "$scratch" -name 'libb64.so.0d*' -exec cp -a {} "$TOOLS/lib/" \;
  rm -rf "$scratch"
elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  log "apt-get install libb64-0d"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null
  fi
elif command -v apt-get >/dev/null; then
  log "not root: unpacking libb64-0d into $TOOLS/lib (apt-get download + dpkg-deb, no install)"
  scratch="$(mktemp -d)"
  if (cd "$scratch" && apt-get download libb64-0d >/dev/null 2>&1); then
    dpkg-deb -x "$scratch"/libb64-0d_*.deb "$scratch/root"
    find "$scratch/root" -name 'libb64.so.0d*' -exec cp -a {} "$TOOLS/lib/" \;
  fi
  rm -rf "$scratch"
  if [[ ! -e "$TOOLS/lib/libb64.so.0d" ]]; then
    log "could not get libb64.so.0d without root: run 'sudo apt-get install libb64-0d' and rerun this script"
    exit 1
  fi
else
  log "libb64.so.0d is missing and this is not a Debian-like system: install libb64 (libb64.so.0d) and rerun"
  exit 1
fi

write_wrapper "$BINARY" "$TOOLS/lib:$CUDART_DIR"
