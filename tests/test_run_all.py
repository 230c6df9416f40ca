"""perf/run_all.py's bookkeeping: a comparison that fails is a note, not the end of the run."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import run_all  # noqa: E402 (perf/ is not a package)


def test_a_comparison_that_fails_becomes_a_note_and_the_run_goes_on():
    result = {"comparisons": {}, "notes": []}

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    assert run_all.compare(result, "serving", out_of_memory) is None
    assert result["comparisons"] == {}
    assert result["notes"] == ["comparison serving failed: RuntimeError: CUDA out of memory"]

    assert run_all.compare(result, "snac", lambda: {"cpu_ratio": 0.4}) == {"cpu_ratio": 0.4}
    assert result["comparisons"] == {"snac": {"cpu_ratio": 0.4}}
    assert len(result["notes"]) == 1
