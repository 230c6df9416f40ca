#!/usr/bin/env bash
# The benchmark on a GPU machine with no network: fetch wheels here, install and run there.
#
#   perf/gpu/run_on_gpu.sh fetch          # on a machine with PyPI access: wheels -> perf/gpu/wheels/
#   perf/gpu/run_on_gpu.sh pack           # then: what the serving benchmark needs in one <64 MiB folder, wheels/lean/
#   perf/gpu/run_on_gpu.sh setup          # on the GPU machine: offline install into perf/gpu/.venv
#   perf/gpu/run_on_gpu.sh bench [ARGS]   # on the GPU machine: perf/run_all.py with the GPU defaults + ARGS
#   perf/gpu/run_on_gpu.sh check          # on the GPU machine: perf/gpu/check_gpu.py, a pass or fail per GPU path
#   perf/gpu/run_on_gpu.sh all [ARGS]     # setup, check, then bench
#   perf/gpu/run_on_gpu.sh relay [ARGS]   # on the GPU machine's CPUs: perf/relay_bench.py, 4 relay processes
#   perf/gpu/run_on_gpu.sh short [ARGS]   # setup, then the steps of SHORT_STEPS, all within SHORT_SECONDS (short())
#
# The GPU machine is expected to have Python 3.12 with PyTorch (CUDA), numpy,
# transformers, tokenizers and safetensors installed. What it lacks comes as wheels
# (no sdists), downloaded for CPython 3.12 / manylinux x86_64 without dependency
# resolution, so nothing that is already there (torch above all) is fetched again:
#
#   wheels/server/         nvidia-pytriton (tritonserver 2.51 + Python backend; ~53 MiB)
#   wheels/tools/          tritonclient[grpc] and its deps, pytriton's small deps, snac, matplotlib
#   wheels/perf_analyzer/  tritonclient 2.47.0 (its perf_analyzer), nvidia-cuda-runtime-cu12, libb64-0d .deb
#   wheels/profiler/       py-spy (the serving report's stacks of the model stubs: perf/stacks.py)
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
  # numpy < 2: tritonserver 2.51's Python backend stub misreads string tensors under numpy 2 (GPU images ship 2.x)
  numpy
  "matplotlib>=3.7" contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six
)
PERF_ANALYZER_WHEELS=("tritonclient==2.47.0" "nvidia-cuda-runtime-cu12>=12,<13")
# py-spy: where a served level's threads are (perf/stacks.py); a static binary, carried as wheels/lean/py-spy.xz
PROFILER_WHEELS=("py-spy>=0.3")

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

# What `pack` keeps of the tool wheels: what the serving benchmark needs beyond a usual PyTorch image.
LEAN_WHEELS=(numpy tritonclient python_rapidjson grpcio protobuf ml_dtypes snac einops)  # einops: snac imports it

pack() {
  # One transfer of at most 64 MiB -> wheels/lean/, three xz archives and py-spy (xz packs shared libraries
  # far tighter than a wheel's zip: 53 MB instead of 95 MB of wheels):
  #   site-nvidia_pytriton-py3.12.tar.xz  nvidia-pytriton without the stubs and libpython of other Pythons
  #   site-tools-py3.12.tar.xz            the tool wheels in LEAN_WHEELS, unpacked as pip installs them
  #   perf_analyzer.tar.xz                perf_analyzer from tritonclient 2.47.0, libcudart.so.12, libb64.so.0d
  #   py-spy.xz                           py-spy's static binary (setup puts it in perf/.tools/bin)
  # `setup` unpacks the site-* archives into site-packages and the last one into perf/.tools.
  [[ -d "$WHEELS/server" && -d "$WHEELS/tools" ]] || { log "run '$0 fetch' first"; exit 1; }
  local lean="$WHEELS/lean" work name
  work="$(mktemp -d)"
  rm -rf "$lean"
  mkdir -p "$lean" "$work/pytriton" "$work/tools" "$work/perf_analyzer/libexec" "$work/perf_analyzer/lib"
  python3 -m zipfile -e "$WHEELS"/server/nvidia_pytriton-*.whl "$work/pytriton"
  find "$work/pytriton/pytriton/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name "$PY_VERSION" \
    -exec rm -rf {} +
  rm -f "$work"/pytriton/nvidia_pytriton.libs/libpython3-*.so*  # the bundled libpython serves only another version's stub
  chmod +x "$work/pytriton/pytriton/tritonserver/bin/tritonserver" \
    "$work/pytriton/pytriton/tritonserver/python_backend_stubs/$PY_VERSION/"*
  for name in "${LEAN_WHEELS[@]}"; do
    unpack_wheel "$(compgen -G "$WHEELS/tools/$name-*.whl" | head -n 1)" "$work/tools"
  done
  log "compressing nvidia-pytriton and the tool wheels (two minutes) ..."
  tar -C "$work/pytriton" -cJf "$lean/site-nvidia_pytriton-py$PY_VERSION.tar.xz" . &
  tar -C "$work/tools" -cJf "$lean/site-tools-py$PY_VERSION.tar.xz" .
  wait
  if compgen -G "$WHEELS/perf_analyzer/tritonclient-*.whl" >/dev/null; then
    pack_perf_analyzer "$work/perf_analyzer" "$lean/perf_analyzer.tar.xz"
  else
    log "no wheels/perf_analyzer: the GPU machine runs without perf_analyzer"
  fi
  if compgen -G "$WHEELS/profiler/py_spy-*.whl" >/dev/null; then  # the binary alone, about 2 MB packed
    python3 -m zipfile -e "$(compgen -G "$WHEELS/profiler/py_spy-*.whl" | head -n 1)" "$work/py_spy"
    xz -9 -c "$(find "$work/py_spy" -path '*/scripts/py-spy' | head -n 1)" >"$lean/py-spy.xz"
  else
    log "no wheels/profiler: the GPU machine runs without py-spy (no stacks in the serving report)"
  fi
  rm -rf "$work"
  du -sh "$lean" >&2
}

unpack_wheel() {  # unpack_wheel WHEEL DIR: its files where pip puts them in site-packages (no scripts or headers)
  python3 - "$1" "$2" <<'PY'
import sys, zipfile
from pathlib import Path
wheel, site = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as archive:
    for info in archive.infolist():
        parts = Path(info.filename).parts
        if parts[0].endswith(".data"):  # NAME.data/purelib|platlib/... belongs in site-packages itself
            if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                continue
            parts = parts[2:]
        if info.is_dir():
            continue
        target = site.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.read(info))
        if info.external_attr >> 16 & 0o111:
            target.chmod(0o755)
PY
}

pack_perf_analyzer() {  # pack_perf_analyzer WORKDIR ARCHIVE: the binary and the two libraries it lacks there
  local work="$1" archive="$2" deb
  python3 - "$WHEELS/perf_analyzer" "$work" <<'PY'
import sys, zipfile
from pathlib import Path
wheels, work = Path(sys.argv[1]), Path(sys.argv[2])
wanted = {"tritonclient-*.whl": ("/data/bin/perf_analyzer", work / "libexec" / "perf_analyzer"),
          "nvidia_cuda_runtime_cu12-*.whl": ("/lib/libcudart.so.12", work / "lib" / "libcudart.so.12")}
for pattern, (suffix, target) in wanted.items():
    wheel = next(wheels.glob(pattern))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(suffix))
        target.write_bytes(archive.read(member))
    target.chmod(0o755)
PY
  deb="$(compgen -G "$WHEELS/perf_analyzer/libb64-0d_*.deb" | head -n 1 || true)"
  if [[ -n "$deb" ]]; then
    dpkg-deb -x "$deb" "$work/deb"
    find "$work/deb" -name 'libb64.so.0d*' -exec cp -aL {} "$work/lib/" \;
    rm -rf "$work/deb"
  else
    log "no libb64-0d .deb in wheels/perf_analyzer: the GPU machine needs libb64.so.0d installed"
  fi
  tar -C "$work" -cJf "$archive" libexec lib
}

fetch() {
  log "downloading wheels for CPython $PY_VERSION into $WHEELS (versions pinned to $PYTHON's where installed)"
  rm -rf "$WHEELS"
  download "$WHEELS/server" "${SERVER_WHEELS[@]}"
  download "$WHEELS/tools" "${TOOL_WHEELS[@]}"
  download "$WHEELS/perf_analyzer" "${PERF_ANALYZER_WHEELS[@]}"
  download "$WHEELS/profiler" "${PROFILER_WHEELS[@]}"
  (cd "$WHEELS/perf_analyzer" && apt-get download libb64-0d >/dev/null 2>&1) ||
    log "could not apt-get download libb64-0d (perf_analyzer on the GPU machine will need it installed)"
  du -sh "$WHEELS"/* >&2
}

setup() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
  local python
  python="$(command -v "python$PY_VERSION" || command -v python3)"
  if [[ ! -x "$VENV/bin/python" ]]; then
    if "$python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
      # The image's python3 is a virtual environment itself: a venv made from it would see the base
      # interpreter's packages, not this one's torch. Install into it instead (the machine is disposable).
      log "$python is a virtual environment: installing into it ($VENV links to it)"
      ln -sfn "$("$python" -c 'import sys; print(sys.prefix)')" "$VENV"
    else
      log "creating $VENV (sees the system's torch, transformers, tokenizers, safetensors)"
      "$python" -m venv --system-site-packages "$VENV" 2>/dev/null ||
        { rm -rf "$VENV"; "$python" -m venv --system-site-packages --without-pip "$VENV"; }  # no ensurepip
    fi
  fi
  local found=() packed=() incoming=() site
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # The project itself, as a path in site-packages: the Python backend stub ignores PYTHONPATH, and a
  # pip install would need a build backend this offline machine may not have in the version wanted.
  echo "$REPO/src" >"$site/orpheus_triton_src.pth"
  shopt -s nullglob
  for dir in "$WHEELS/server" "$WHEELS/tools" "$WHEELS/lean"; do
    found+=("$dir"/*.whl)
  done
  packed=("$WHEELS"/lean/site-*.tar.xz)
  shopt -u nullglob
  if ((${#found[@]})); then
    log "installing ${#found[@]} wheels offline"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps "${found[@]}"
  fi
  for bundle in "${packed[@]}"; do
    log "unpacking $(basename "$bundle") into $site"
    # What pip does before installing a wheel: remove the files of another version of each distribution
    # (by its RECORD), in this site only; else, e.g., numpy 2's files would stay beside numpy 1.26's.
    mapfile -t incoming < <(tar -tJf "$bundle" | sed -n 's|^\./\([^/]*\)\.dist-info/$|\1|p')
    "$VENV/bin/python" - "$site" "${incoming[@]}" <<'PY'
import re, shutil, sys
from pathlib import Path
site = Path(sys.argv[1])
def key(name):  # a distribution's name as dist-info folders spell it, compared case- and separator-blind
    return re.sub(r"[-_.]+", "_", name).lower()
for incoming in sys.argv[2:]:
    name = incoming.rsplit("-", 1)[0]
    for old in site.glob("*.dist-info"):
        installed = old.name[: -len(".dist-info")]  # NAME-VERSION
        if installed == incoming or key(installed.rsplit("-", 1)[0]) != key(name):
            continue
        record = old / "RECORD"
        for line in record.read_text().splitlines() if record.is_file() else []:
            path = (site / line.split(",")[0]).resolve()
            if path.is_relative_to(site.resolve()) and path.is_file():
                path.unlink()
        shutil.rmtree(old, ignore_errors=True)
        print(f"[run_on_gpu] removed {old.name} from {site}", file=sys.stderr)
PY
    tar -C "$site" -xJf "$bundle"
  done
  if [[ -f "$WHEELS/lean/py-spy.xz" ]]; then  # perf/stacks.py looks for it in perf/.tools/bin
    mkdir -p "$REPO/perf/.tools/bin"
    xz -dc "$WHEELS/lean/py-spy.xz" >"$REPO/perf/.tools/bin/py-spy"
    chmod +x "$REPO/perf/.tools/bin/py-spy"
  fi
  if [[ -f "$WHEELS/lean/perf_analyzer.tar.xz" ]]; then
    PERF_ANALYZER_BUNDLE="$WHEELS/lean/perf_analyzer.tar.xz" bash "$REPO/perf/install_perf_analyzer.sh" ||
      log "perf_analyzer not installed; the benchmark runs without it"
  elif [[ -d "$WHEELS/perf_analyzer" ]]; then
    PERF_ANALYZER_WHEELS="$WHEELS/perf_analyzer" PYTHON="$python" bash "$REPO/perf/install_perf_analyzer.sh" ||
      log "perf_analyzer not installed; the benchmark runs without it"
  fi
  PYTHONPATH="$REPO/src" "$VENV/bin/python" - <<'PY'
import importlib
import sys
missing = []
for module in ("torch", "numpy", "safetensors", "tokenizers", "snac", "tritonclient.grpc", "matplotlib",
               "orpheus_triton.server"):
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001
        missing.append(f"{module} ({type(error).__name__}: {error})")
try:
    from pathlib import Path
    from orpheus_triton.server import Ports, server_command
    server_command(Path("."), Ports())  # finds the bundled tritonserver and its stub for this Python
except Exception as error:  # noqa: BLE001
    missing.append(f"tritonserver ({error})")
print("missing: " + "; ".join(missing) if missing else "all modules import")
if "torch" in sys.modules:
    import torch
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
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
    --streams-per-worker 2 --ramp-seconds 5 --min-streams 8 --level-seconds 60 \
    --poisson-rates 4,16 --poisson-streams 64 --serving-repeats 8 \
    --pa-concurrency 1,16,64 --pa-decoder-concurrency 1,16,64 --pa-max-tokens 250 --pa-request-count 16 \
    --engine-tokens 400 --loadgen-processes 8 "$@"
}

check() {
  [[ -x "$VENV/bin/python" ]] || { log "run '$0 setup' first"; exit 1; }
  cd "$REPO"
  PYTHONPATH="$REPO/src" "$VENV/bin/python" perf/gpu/check_gpu.py --out "perf/results/gpu-check"
}

short() {
  # A lent GPU for minutes, not hours: every GPU figure that fits, each step bounded so that a slow or failing
  # one leaves time for the next. SHORT_SECONDS (default 540) bounds the whole, setup included; SHORT_STEPS names the steps, run
  # in the order named (default "check models serving serving-mps serving-paced serving-plumbing engine
  # perf-analyzer serving-no-overlap"; also "comparisons", "profile", "profile-no-overlap", "snac-sizes",
  # "engine-eager-sampling", "engine-no-overlap", "round-trips", "serving-newcomer-off", "serving-decoder-inline",
  # "serving-paced-lanes", "serving-max-callers", "callers").
  # A step that needs the model set makes it first when `models` has not run. Results in perf/results/gpu-short/.
  [[ -x "$VENV/bin/python" ]] || { log "run '$0 setup' first"; exit 1; }
  cd "$REPO"
  # The deadline counts from before setup, less SHORT_RESERVE_SECONDS (a step's 20 s kill margin, the summary,
  # the archive): the whole command ends within SHORT_SECONDS, which a lent machine's per-call limit can bound.
  local started="${SHORT_STARTED:-$SECONDS}" reserve="${SHORT_RESERVE_SECONDS:-35}"
  local py="$VENV/bin/python" out="$REPO/perf/results/gpu-short"
  local deadline=$((started + ${SHORT_SECONDS:-540} - reserve))
  local steps="${SHORT_STEPS:-check models serving serving-mps serving-paced serving-plumbing engine perf-analyzer
    serving-no-overlap}" name llm=""
  mkdir -p "$out"
  export PYTHONPATH="$REPO/src:$REPO/perf" PYTHONUNBUFFERED=1
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$py" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, torch.version.cuda)'
    nproc
    # the Python backend stub links libpython of this interpreter's version
    ldconfig -p | grep -i libpython || true
    "$py" -c 'import sysconfig; print("LIBDIR", sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY"))'
    df -h /dev/shm  # the Python backend passes tensors to its stubs through shared memory
  } >"$out/machine.txt" 2>&1
  step() {  # step NAME SECONDS COMMAND...: run it with its log in $out, never past the deadline
    local name="$1" limit="$2" begun=$SECONDS code=0
    shift 2
    ((deadline - SECONDS < limit)) && limit=$((deadline - SECONDS))
    if ((limit < 20)); then log "$name: skipped (deadline)"; echo "skipped: deadline" >"$out/$name.status"; return 1; fi
    log "$name (at most ${limit}s) ..."
    timeout --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1 || code=$?
    echo "exit $code after $((SECONDS - begun)) s" >"$out/$name.status"
    log "$name: exit $code after $((SECONDS - begun)) s"
    tail -n 15 "$out/$name.log" >&2
    return "$code"
  }
  model_set() {  # the Orpheus-3B-shaped model set, made once: its LLM folder in $llm
    [[ -n "$llm" ]] && return 0
    step models 150 "$py" -c 'from common import model_set; print(model_set("orpheus-3b", None)[0].llm)' || true
    llm="$(tail -n 1 "$out/models.log" 2>/dev/null)"
    [[ -d "$llm" ]] || { log "no model set"; llm=""; return 1; }
  }
  # py-spy (setup unpacks it from wheels/lean/py-spy.xz): 5 s of the llm and snac_decoder stubs' stacks a level
  local stack_args=()
  [[ -x "$REPO/perf/.tools/bin/py-spy" ]] && stack_args=(--stack-seconds 5)
  for name in $steps; do
    case "$name" in
      check) step check 180 "$py" perf/gpu/check_gpu.py --out "$out/check" ;;
      # The Python backend's round trips on this host's CPU (about 20 s): what a response send (from 1, 2 and 4
      # threads) and a cancellation pass at 216 streams cost here, where the llm model's cancel_check_seconds is
      # decided.
      round-trips) step round-trips 45 "$py" perf/round_trips.py --streams 216 --seconds 0.5 --runs 2 \
        --out "$out/round-trips" ;;
      snac-sizes) step snac-sizes 90 "$py" perf/gpu/snac_sizes.py --out "$out/snac-sizes" ;;
      models) model_set ;;
      # Bursts: 216 callers at once (a closed-loop level's start) and 128 beside 64 running streams, at the
      # CPU's prefill budget and the GPU's default (engine.PREFILL_TOKENS_PER_STEP). The closed loop: the
      # served sweep's levels in the engine alone, newcomers arriving as streams end (what a served level's
      # engine does, Triton and the decoder left out).
      engine) model_set && step engine 200 "$py" perf/engine_bench.py --shape orpheus-3b --llm "$llm" --device cuda \
        --sweep 1,8,32,64,128,192,256 --max-streams 256 --tokens 300 --repeat 2 \
        --burst 0+216,64+128 --burst-prefill 256,2048,8192 --churn 32,64,128,216 --out "$out/engine" ;;
      # The engine without its overlap (on a GPU by default: host work of a step under the GPU's next step):
      # the A/B against the above.
      engine-no-overlap) model_set && step engine-no-overlap 120 "$py" perf/engine_bench.py --shape orpheus-3b \
        --llm "$llm" --device cuda --no-overlap --sweep 1,64,128,192,256 --max-streams 256 --tokens 300 --repeat 2 \
        --burst 0+216 --out "$out/engine" ;;
      # Closed-loop levels with the workers' first streams spread over 3 s (about one short stream) and two
      # streams each: N concurrent callers in steady state; a burst of N at once is the engine step's bursts.
      # Eight load generator processes: in one, its GIL bounds what hundreds of streams can receive. Six
      # levels: a level runs a round of filler streams before the streams it counts (loadgen.run_closed_loop),
      # up to about 30 s at slower than real time, and the step has 240 s.
      serving) model_set && step serving 240 "$py" perf/run_all.py --shape orpheus-3b --device cuda --max-streams 256 \
        --max-seq-len 1400 --concurrency 1,32,64,96,128,216 --texts short --max-tokens 0 --streams-per-worker 2 \
        --ramp-seconds 3 --min-streams 8 --level-seconds 20 --poisson-rates 8,32 --poisson-streams 96 \
        --skip-comparisons --no-perf-analyzer --retry-busy 0 --loadgen-processes 8 "${stack_args[@]}" \
        --out "$out/serving" "$@" ;;
      # perf_analyzer (setup installs it from wheels/lean/perf_analyzer.tar.xz): `orpheus` streaming and
      # `snac_decoder` alone, on a server of its own with 64 slots; levels 1, 16 and 64, 150-token streams.
      perf-analyzer) model_set && step perf-analyzer 180 "$py" perf/run_perf_analyzer.py --shape orpheus-3b \
        --device cuda --max-streams 64 --max-seq-len 1400 --concurrency 1,16,64 --decoder-concurrency 1,16,64 \
        --max-tokens 150 --request-count 8 --timeout 60 --out "$out/perf-analyzer" ;;
      # The served sweep with the GPU shared under MPS (serve --mps): the engine's and the SNAC decoder's
      # kernels at once instead of in turns (the decoder busy 99% of the time at 128 streams on an H200, the
      # engine waiting for the GPU); the A/B against `serving` at its busiest levels.
      serving-mps) model_set && step serving-mps 150 "$py" perf/run_all.py --mps \
        --shape orpheus-3b --device cuda --max-streams 256 --max-seq-len 1400 --concurrency 1,128,216 --texts short \
        --max-tokens 0 --streams-per-worker 2 --ramp-seconds 3 --min-streams 8 --level-seconds 15 --poisson-rates 32 \
        --poisson-streams 96 --skip-comparisons --no-perf-analyzer --retry-busy 0 --loadgen-processes 8 \
        "${stack_args[@]}" --out "$out/serving-mps" "$@" ;;
      # The served sweep without the engine's overlap: the A/B against `serving`.
      serving-no-overlap) model_set && step serving-no-overlap 150 "$py" perf/run_all.py --shape orpheus-3b \
        --device cuda --max-streams 256 --max-seq-len 1400 --no-overlap --concurrency 1,128,216 --texts short \
        --max-tokens 0 --streams-per-worker 2 --ramp-seconds 3 --min-streams 8 --level-seconds 15 --poisson-rates 32 \
        --poisson-streams 96 --skip-comparisons --no-perf-analyzer --retry-busy 0 --loadgen-processes 8 \
        "${stack_args[@]}" --out "$out/serving-no-overlap" "$@" ;;
      # The served sweep with the llm stage's engine a stand-in without a model (perf/paced_llm: 100 tokens a
      # second a stream, 1.2x real time): everything but the engine's arithmetic (the adapters, Triton, the
      # SNAC decoder on the GPU, the load generator), so what it carries is the pipeline's own ceiling.
      # One level, the bar's 216 streams, no Poisson arrivals (the stand-in loads no LLM weights: the server starts
      # in seconds), so that the engine step after it still fits in one call; its where-the-time-went table names
      # the part that bounds, should it starve streams.
      serving-paced) model_set && step serving-paced 90 "$py" perf/run_all.py --shape orpheus-3b --device cuda \
        --max-streams 256 --max-seq-len 1400 --paced-llm 100 --concurrency 216 --texts short --max-tokens 0 \
        --streams-per-worker 2 --ramp-seconds 3 --min-streams 8 --level-seconds 15 --poisson-rates "" \
        --skip-comparisons --no-perf-analyzer --retry-busy 0 --loadgen-processes 8 \
        "${stack_args[@]}" --out "$out/serving-paced" "$@" ;;
      # serving-paced with both models' responses on two lanes each (--response-thread 2: each stream's on one
      # of two threads): the A/B against serving-paced, for when the round-trips step shows sends from two threads
      # adding up and serving-paced shows a response thread near saturation.
      serving-paced-lanes) model_set && step serving-paced-lanes 90 "$py" perf/run_all.py --shape orpheus-3b \
        --device cuda --max-streams 256 --max-seq-len 1400 --paced-llm 100 --concurrency 216 --texts short \
        --max-tokens 0 --streams-per-worker 2 --ramp-seconds 3 --min-streams 8 --level-seconds 15 --poisson-rates "" \
        --skip-comparisons --no-perf-analyzer --retry-busy 0 --loadgen-processes 8 --llm-response-thread 2 \
        --decoder-response-thread 2 "${stack_args[@]}" --out "$out/serving-paced-lanes" "$@" ;;
      # The same with the SNAC decoder's SNAC a stand-in too (perf/silent_snac: a frame of silence a window, no
      # model): only what carries the audio (preprocessing, Triton, both adapters, the load generator). Where
      # serving-paced starves streams, this says whether the SNAC decoder's GPU work is why.
      serving-plumbing) model_set && step serving-plumbing 120 "$py" perf/run_all.py --shape orpheus-3b --device cuda \
        --max-streams 256 --max-seq-len 1400 --paced-llm 100 --silent-snac --concurrency 128,216 --texts short \
        --max-tokens 0 --streams-per-worker 2 --ramp-seconds 3 --min-streams 8 --level-seconds 15 --poisson-rates "" \
        --skip-comparisons --no-perf-analyzer --retry-busy 0 --loadgen-processes 8 \
        "${stack_args[@]}" --out "$out/serving-plumbing" "$@" ;;
      # The served sweep bounded with serve's --max-callers (above the levels: nobody refused): every admission then
      # counts the callers in flight (`serving` counts them too, unbounded, as serve does); the A/B against it.
      serving-max-callers) model_set && step serving-max-callers 150 "$py" perf/run_all.py --shape orpheus-3b \
        --device cuda --max-streams 256 --max-seq-len 1400 --max-callers 256 --concurrency 1,128,216 --texts short \
        --max-tokens 0 --streams-per-worker 2 --ramp-seconds 3 --min-streams 8 --level-seconds 15 --poisson-rates 32 \
        --poisson-streams 96 --skip-comparisons --no-perf-analyzer --retry-busy 0 --loadgen-processes 8 \
        "${stack_args[@]}" --out "$out/serving-max-callers" "$@" ;;
      # What each lease operation costs on this host's CPU and disk (perf/callers_bench.py; no GPU, seconds).
      callers) step callers 60 "$py" perf/callers_bench.py --out "$out/callers" ;;
      # The decoder's newcomer round off (0 s): the A/B against `serving` for first audio under arrivals.
      serving-newcomer-off) model_set && step serving-newcomer-off 150 "$py" perf/run_all.py --shape orpheus-3b \
        --device cuda --max-streams 256 --max-seq-len 1400 --decoder-newcomer-horizon 0 \
        --concurrency 1,128,216 --texts short --max-tokens 0 --streams-per-worker 2 --ramp-seconds 3 \
        --min-streams 8 --level-seconds 15 --poisson-rates 8,32 --poisson-streams 96 --skip-comparisons \
        --no-perf-analyzer --retry-busy 0 --loadgen-processes 8 "${stack_args[@]}" --out "$out/serving-newcomer-off" \
        "$@" ;;
      # The decoder's responses sent inline by its worker (the CPU's way): the A/B against `serving`, where a
      # response thread sends them while the next round decodes.
      serving-decoder-inline) model_set && step serving-decoder-inline 150 "$py" perf/run_all.py --shape orpheus-3b \
        --device cuda --max-streams 256 --max-seq-len 1400 --decoder-response-thread false \
        --concurrency 1,128,216 --texts short --max-tokens 0 --streams-per-worker 2 --ramp-seconds 3 \
        --min-streams 8 --level-seconds 15 --poisson-rates 32 --poisson-streams 96 --skip-comparisons \
        --no-perf-analyzer --retry-busy 0 --loadgen-processes 8 "${stack_args[@]}" \
        --out "$out/serving-decoder-inline" "$@" ;;
      comparisons) model_set && step comparisons 150 "$py" perf/run_all.py --shape orpheus-3b --device cuda \
        --max-streams 16 --max-seq-len 1400 --concurrency 1 --texts short --max-tokens 0 --min-streams 4 \
        --level-seconds 20 --poisson-rates "" --serving-repeats 6 --engine-tokens 100 --no-perf-analyzer \
        --retry-busy 0 --out "$out/comparisons" "$@" ;;
      engine-eager-sampling) model_set && step engine-eager-sampling 120 "$py" perf/engine_bench.py --shape orpheus-3b \
        --llm "$llm" --device cuda --no-graph-sampling --sweep 1,64,128,192 --max-streams 192 --tokens 300 --repeat 2 \
        --out "$out/engine" ;;
      profile) model_set && step profile 90 "$py" perf/gpu/profile_step.py --shape orpheus-3b --llm "$llm" \
        --device cuda --streams 1,128 --out "$out/profile" ;;
      profile-no-overlap) model_set && step profile-no-overlap 60 "$py" perf/gpu/profile_step.py --shape orpheus-3b \
        --llm "$llm" --device cuda --streams 1,128 --no-overlap --out "$out/profile-no-overlap" ;;
      *) log "$name: no such step" ;;
    esac || true
  done
  # A backend stub that dies of a signal (a segfault, the OOM killer) says so here, not in the server log.
  dmesg 2>/dev/null | tail -n 60 >"$out/dmesg.txt" || true
  # The figures on one page (SUMMARY.md), printed last: the tail of this command's output.
  "$py" perf/gpu/summarize.py "$out" || log "no summary"
  # The folder without its raw/ data (chunk arrival times, server logs: tens of MB) in one archive small
  # enough to hand back from a lent machine: perf/results/gpu-short.tgz.
  # A lent machine hands back what its command leaves in $OUT: the archive goes there too, once it is whole.
  if tar -czf "$out.tgz" --exclude=raw -C "$(dirname "$out")" "$(basename "$out")"; then
    log "$(du -h "$out.tgz" | cut -f1) in $out.tgz (without raw/)"
    if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then cp "$out.tgz" "$OUT/" && log "copied to $OUT"; fi
  else
    log "no archive"
  fi
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
  pack) pack ;;
  setup) setup ;;
  bench) shift; bench "$@" ;;
  check) check ;;
  all) shift; setup; check; bench "$@" ;;
  relay) shift; relay "$@" ;;
  short) shift; SHORT_STARTED=$SECONDS; setup; short "$@" ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
