"""The READMEs' links to files of the project (results, scripts, other docs)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked_files() -> set[Path] | None:
    """The files git keeps (None outside a git checkout): a link to an ignored file (a run's raw/ data)
    works only where that run was made."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {ROOT / name for name in listed.stdout.decode().split("\0") if name}


def test_every_relative_link_of_the_readmes_names_a_file_the_project_keeps():
    readmes = [ROOT / "README.md", *ROOT.glob("*/README.md"), *ROOT.glob("perf/*/README.md"),
               *ROOT.glob("perf/results/*/README.md")]
    tracked = tracked_files()
    missing = []
    for readme in readmes:
        for target in LINK.findall(readme.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or a heading of the same page
            path = (readme.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{readme.relative_to(ROOT)}: {target} (no such file)")
            elif tracked is not None and not path.is_dir() and path not in tracked:
                missing.append(f"{readme.relative_to(ROOT)}: {target} (not kept by git: add it, or link a kept file)")
    assert not missing, missing
