"""Where a served level's Python threads spend their time: py-spy samples of the server's model stubs.

The *where the time went* table says how busy the engine and the decoder are and which process's
busiest thread is near a core; when a stage is busy, or a thread bound, this says on what: py-spy
(a sampling profiler that reads another process's Python stacks from outside, no change to the
server) records each chosen stub for a few seconds in the middle of a level, idle samples included,
and each thread's samples are summed by the innermost function of this project they were in
(``orpheus_triton`` or a model's ``model.py``; a thread waiting in Triton's own calls shows as the
function of ours that called it). Imports nothing heavy: the GPU summary uses ``stacks_table`` too.

py-spy comes from PyPI (``pip install py-spy``: a static binary, perf/gpu/run_on_gpu.sh carries it to
a GPU machine); it needs to be allowed to read the stubs' memory (ptrace: the same user, or
CAP_SYS_PTRACE in a container). Where it cannot, a level records why instead of its stacks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

PERF = Path(__file__).resolve().parent
# Frames of these files are "ours": the project's package and the model repository's adapters (py-spy
# names a file by its path relative to sys.path, or as the stub loaded it: model.py).
OUR_FILES = ("orpheus_triton/", "model.py:")
TOP_FUNCTIONS = 8  # per thread, in the summary


def py_spy() -> str | None:
    """The py-spy binary: on PATH, beside this interpreter (a venv's bin/), or where run_on_gpu.sh puts it."""
    for candidate in (shutil.which("py-spy"), Path(sys.executable).with_name("py-spy"),
                      PERF / ".tools" / "bin" / "py-spy"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def _function(frame: str) -> tuple[str, bool]:
    """(function name, whether it is ours) of one py-spy frame, ``name (file:line)``."""
    name, _, where = frame.partition(" (")
    return name, any(where.startswith(part) or f"/{part}" in where for part in OUR_FILES)


def summarize(raw: str, top: int = TOP_FUNCTIONS, common: float = 0.8) -> dict[str, dict]:
    """py-spy's raw output (``--format raw --threads``: one line per distinct stack, ``thread (tid): name;
    frame;...;frame COUNT``) as {thread name: {"samples": n, "functions": [[function, share], ...],
    "within": function, "parts": [[function, share], ...]}}.

    *functions*: each sample under the innermost function of ours on its stack (else its innermost frame).
    *parts*: the same samples one level below the deepest function of ours that at least ``common`` of
    them pass through (*within*: for an engine's thread its step, so the parts are the step's parts);
    absent where no function of ours is that common.
    """
    threads: dict[str, list[tuple[list[str], str, int]]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not line.startswith("thread (") or not count.isdigit() or not int(count):
            continue  # py-spy's own messages
        first, *frames = stack.split(";")
        thread = first.split(": ", 1)[-1]
        functions = [_function(frame) for frame in frames]
        ours = [name for name, mine in functions if mine]
        leaf = functions[-1][0] if functions else "(no Python frame)"
        threads.setdefault(thread, []).append((ours, ours[-1] if ours else leaf, int(count)))
    out = {}
    for thread, samples in sorted(threads.items(), key=lambda kv: -sum(n for *_, n in kv[1])):
        total = sum(n for *_, n in samples)
        innermost = Counter()
        for _, where, n in samples:
            innermost[where] += n
        figures = {"samples": total, "functions": _shares(innermost, total, top)}
        prefix = _common_prefix([(ours, n) for ours, _, n in samples], common * total)
        if prefix:
            parts = Counter()
            for ours, where, n in samples:
                inside = ours[: len(prefix)] == prefix and len(ours) > len(prefix)
                parts[ours[len(prefix)] if inside else ("(itself)" if ours[: len(prefix)] == prefix else where)] += n
            figures |= {"within": prefix[-1], "parts": _shares(parts, total, top)}
        out[thread] = figures
    return out


def _shares(counts: Counter, total: int, top: int) -> list[list]:
    return [[name, round(n / total, 3)] for name, n in counts.most_common(top)]


def _common_prefix(samples: list[tuple[list[str], int]], at_least: float) -> list[str]:
    """The longest run of our functions, from the outside in, that samples of ``at_least`` weight share."""
    prefix: list[str] = []
    while True:
        depth = len(prefix)
        nexts = Counter()
        for ours, n in samples:
            if ours[:depth] == prefix and len(ours) > depth:
                nexts[ours[depth]] += n
        if not nexts:
            return prefix
        name, n = nexts.most_common(1)[0]
        if n < at_least:
            return prefix
        prefix.append(name)


def stack_monitor(stubs, seconds: float, delay: float, folder: Path | None, rate: int = 100):
    """A level ``monitor`` (loadgen.sweep's): ``delay`` seconds into each level, py-spy records each stub
    of ``stubs()`` ({model name: pid}, read as the level starts) for ``seconds``; the function each start
    returns gives {"server_stacks": {model: summary or {"error": why}}} at the level's end, and leaves
    py-spy's raw output in ``folder`` (if given) as stacks_<model>_<n>.txt."""
    binary = py_spy()
    counter = [0]

    def start():
        counter[0] += 1
        number, results = counter[0], {}
        if binary is None:
            return lambda: {"server_stacks": {"error": "py-spy not found (pip install py-spy)"}}
        targets = stubs()

        def record(model: str, pid: int) -> None:
            with tempfile.TemporaryDirectory() as scratch:
                path = Path(folder or scratch) / f"stacks_{model}_{number}.txt"
                command = [binary, "record", "--pid", str(pid), "--idle", "--threads", "--nonblocking",
                           "--format", "raw", "--rate", str(rate), "--duration", str(max(1, round(seconds))),
                           "--output", str(path)]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
                    raw = path.read_text() if path.is_file() else ""
                except (OSError, subprocess.TimeoutExpired) as error:
                    results[model] = {"error": f"{type(error).__name__}: {error}"[:300]}
                    return
            summary = summarize(raw)
            why = (done.stderr + done.stdout).strip() or "no samples"
            results[model] = summary if summary else {"error": why[-300:]}

        def run() -> None:
            time.sleep(delay)
            workers = [threading.Thread(target=record, args=item, daemon=True) for item in targets.items()]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()

        thread = threading.Thread(target=run, name="stack-sampler", daemon=True)
        thread.start()

        def finish(span=None) -> dict:  # the samples' own seconds, whatever span the level counted
            thread.join(timeout=delay + seconds + 40)
            return {"server_stacks": dict(results) or {"error": "the level ended before py-spy was done"}}

        return finish

    return start


def stacks_table(levels: list[tuple[str, dict]], threads: int | None = None) -> list[str]:
    """Markdown lines: per level and stub, its threads (the first ``threads`` of them; all by default: with
    idle samples every thread has as many) and where each spent its time, but those never in Python (a
    stub's main thread, waiting in Triton's calls)."""
    lines = []
    for label, level in levels:
        stacks = level.get("server_stacks")
        if not stacks:
            continue
        if "error" in stacks:
            lines.append(f"- {label}: no stacks ({stacks['error']})")
            continue
        for model, summary in stacks.items():
            if "error" in summary:
                lines.append(f"- {label}, `{model}`: no stacks ({summary['error']})")
                continue
            for thread, figures in list(summary.items())[:threads]:
                if figures["functions"] == [["(no Python frame)", 1.0]]:
                    continue
                where = ", ".join(f"{name} {share:.0%}" for name, share in figures["functions"])
                lines.append(f"- {label}, `{model}`, thread {thread} ({figures['samples']} samples): {where}")
                if figures.get("parts"):
                    parts = ", ".join(f"{name} {share:.0%}" for name, share in figures["parts"])
                    lines.append(f"  - within {figures['within']}: {parts}")
    if not lines:
        return []
    return ["Where the stubs' threads were (py-spy, idle samples included; each sample under the innermost "
            "function of this project on its stack):", "", *lines]
