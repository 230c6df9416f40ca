"""The tritonserver launcher's environment checks (no server started)."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from orpheus_triton import server


def test_numpy_2_is_refused_for_the_bundled_stub_with_the_fix_named(monkeypatch):
    server.check_stub_numpy("1.26.4")
    with pytest.raises(RuntimeError, match=r"numpy 2\.5\.2 .*pip install 'numpy<2'"):
        server.check_stub_numpy("2.5.2")
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "2.0.0" if name == "numpy" else real_version(name))
    with pytest.raises(RuntimeError, match="numpy < 2"):
        server.backend_directory()


def test_bundled_server_is_found_without_importing_pytriton(monkeypatch):
    monkeypatch.delitem(sys.modules, "pytriton", raising=False)
    binary_dir, libs = server._pytriton_dist()
    assert (binary_dir / "bin" / "tritonserver").is_file() and libs.is_dir()
    assert "pytriton" not in sys.modules
