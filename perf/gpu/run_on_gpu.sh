#!/usr/bin/env bash
# The benchmark on a GPU machine with no network: fetch wheels here, install and run there.
#
#   perf/gpu/run_on_gpu.sh fetch          # on a machine with PyPI access: wheels -> perf/gpu/wheels/
#   perf/gpu/run_on_gpu.sh setup          # on the GPU machine: offline install into perf/gpu/.venv
#   perf/gpu/run_on_gpu.sh bench [ARGS]   # on the GPU machine: perf/run_all.py with the GPU defaults + ARGS
#   perf/gpu/run_on_gpu.sh check          # on the GPU machine: perf/gpu/check_gpu.py, a pass or fail per GPU path
#   perf/gpu/run_on_gpu.sh all [ARGS]     # setup, check, then bench
#   perf/gpu/run_on_gpu.sh relay [ARGS]   # on the GPU machine's CPUs: perf/relay_bench.py, 4 relay processes
#
# The GPU machine is expected to have Python 3.12 with PyTorch (CUDA), numpy,
# transformers, tokenizers and safetensors installed. What it lacks comes as wheels
# (no sdists), downloaded for CPython 3.12 / manylinux x86_64 without dependency
# resolution, so nothing that is already there (torch above all) is fetched again:
#
#   wheels/server/         nvidia-pytriton (tritonserver 2.51 + Python backend; ~53 MiB)
#   wheels/tools/          tritonclient[grpc] and its deps, pytriton's small deps, snac, matplotlib
#   wheels/perf_analyzer/  tritonclient 2.47.0 (its perf_analyzer), nvidia-cuda-runtime-cu12, libb64-0d .deb
#
# The folders are split so that each stays under a 64 MiB transfer limit: carry
# wheels/server with one `setup` call and wheels/tools + wheels/perf_analyzer with
# the next (`all`); setup installs whatever wheels are present and skips the rest.
# The model set is generated there: random weights in Orpheus 3B's shape (bf16,
# ~6.6 GB on disk), since no weights can be downloaded.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WHEELS="$HERE/wheels"
VENV="$HERE/.venv"
# fetch: the interpreter whose installed versions the wheels are pinned to (the project's venv if present)
PYTHON="${PYTHON:-$( [[ -x "$REPO/.venv/bin/python" ]] && echo "$REPO/.venv/bin/python" || echo python3)}"
PY_VERSION=3.12
PLATFORMS=(manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64
  manylinux_2_26_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
  manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)

SERVER_WHEELS=("nvidia-pytriton==0.7.0")
TOOL_WHEELS=(
  "tritonclient[grpc]>=2.50" grpcio protobuf python-rapidjson urllib3 ml-dtypes
  # imported by `import pytriton` (the launcher finds tritonserver through it)
  importlib-metadata zipp pyzmq sh typing-inspect mypy-extensions wrapt typer click rich shellingham
  markdown-it-py mdurl pygments annotated-doc
  "snac==1.2.1" einops
  "matplotlib>=3.7" contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six
)
PERF_ANALYZER_WHEELS=("tritonclient==2.47.0" "nvidia-cuda-runtime-cu12>=12,<13")

log() { echo "[run_on_gpu] $*" >&2; }

pinned() {  # PACKAGE... -> the same names, a bare name pinned to the version installed here (the tested one)
  "$PYTHON" - "$@" <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    if re.fullmatch(r"[A-Za-z0-9_.-]+", spec):
        try:
            spec = f"{spec}=={version(spec)}"
        except PackageNotFoundError:
            pass
    print(spec)
PY
}

download() {  # download DIR PACKAGE...
  local dir="$1"
  shift
  local platform_args=() specs=()
  for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
  mapfile -t specs < <(pinned "$@")
  mkdir -p "$dir"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" "${platform_args[@]}" --platform any -d "$dir" "${specs[@]}"
}

fetch() {
  log "downloading wheels for CPython $PY_VERSION into $WHEELS (versions pinned to $PYTHON's where installed)"
  rm -rf "$WHEELS"
  download "$WHEELS/server" "${SERVER_WHEELS[@]}"
  download "$WHEELS/tools" "${TOOL_WHEELS[@]}"
  download "$WHEELS/perf_analyzer" "${PERF_ANALYZER_WHEELS[@]}"
  (cd "$WHEELS/perf_analyzer" && apt-get download libb64-0d >/dev/null 2>&1) ||
    log "could not apt-get download libb64-0d (perf_analyzer on the GPU machine will need it installed)"
  du -sh "$WHEELS"/* >&2
}

setup() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
  local python
  python="$(command -v "python$PY_VERSION" || command -v python3)"
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV (sees the system's torch, transformers, tokenizers, safetensors)"
    "$python" -m venv --system-site-packages "$VENV" 2>/dev/null ||
      { rm -rf "$VENV"; "$python" -m venv --system-site-packages --without-pip "$VENV"; }  # no ensurepip: system pip
  fi
  local found=()
  shopt -s nullglob
  for dir in "$WHEELS/server" "$WHEELS/tools"; do
    found+=("$dir"/*.whl)
  done
  shopt -u nullglob
  if ((${#found[@]})); then
    log "installing ${#found[@]} wheels offline"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps "${found[@]}"
  fi
  if [[ -d "$WHEELS/perf_analyzer" ]]; then
    PERF_ANALYZER_WHEELS="$WHEELS/perf_analyzer" PYTHON="$python" bash "$REPO/perf/install_perf_analyzer.sh" ||
      log "perf_analyzer not installed; the benchmark runs without it"
  fi
  PYTHONPATH="$REPO/src" "$VENV/bin/python" - <<'PY'
import importlib
missing = []
for module in ("torch", "numpy", "safetensors", "tokenizers", "snac", "tritonclient.grpc", "pytriton", "matplotlib",
               "orpheus_triton.server"):
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001
        missing.append(f"{module} ({type(error).__name__}: {error})")
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
print("missing: " + "; ".join(missing) if missing else "all modules import")
PY
}

bench() {
  [[ -x "$VENV/bin/python" ]] || { log "run '$0 setup' first"; exit 1; }
  cd "$REPO"
  # Orpheus-3B-shaped random weights; engine slots for 256 streams with room for the long text
  # (prompt + 1200 tokens); levels around the bar to beat (216 real-time streams per H100).
  PYTHONPATH="$REPO/src" "$VENV/bin/python" perf/run_all.py \
    --shape orpheus-3b --device cuda --max-streams 256 --max-seq-len 1400 \
    --concurrency 1,8,32,64,128,192,216,256 --texts short,medium --max-tokens 0 \
    --streams-per-worker 1 --min-streams 8 --level-seconds 60 \
    --poisson-rates 4,16 --poisson-streams 64 --serving-repeats 8 \
    --pa-concurrency 1,16,64 --pa-decoder-concurrency 1,16,64 --pa-max-tokens 250 --pa-request-count 16 \
    --engine-tokens 400 "$@"
}

check() {
  [[ -x "$VENV/bin/python" ]] || { log "run '$0 setup' first"; exit 1; }
  cd "$REPO"
  PYTHONPATH="$REPO/src" "$VENV/bin/python" perf/gpu/check_gpu.py --out "perf/results/gpu-check"
}

relay() {
  [[ -x "$VENV/bin/python" ]] || { log "run '$0 setup' first"; exit 1; }
  cd "$REPO"
  # The relay that the TensorRT-LLM repository puts in front of the engine, with a stand-in engine
  # model: CPU per token on this host's cores, up to the 216-stream bar, as the GPU repository runs it.
  PYTHONPATH="$REPO/src" "$VENV/bin/python" perf/relay_bench.py --streams 64,128,216 --tokens 400 \
    --relay-instances 4 --out "perf/results/gpu-relay" "$@"
}

case "${1:-}" in
  fetch) fetch ;;
  setup) setup ;;
  bench) shift; bench "$@" ;;
  check) check ;;
  all) shift; setup; check; bench "$@" ;;
  relay) shift; relay "$@" ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
