"""The runtime never imports torch: importing every edge module leaves torch out of sys.modules."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EDGE = Path(__file__).resolve().parents[1] / "edge"


def test_edge_does_not_import_torch():
    modules = sorted("edge." + ".".join(p.relative_to(EDGE).with_suffix("").parts)
                     for p in EDGE.rglob("*.py") if p.name != "__init__.py" and "tensorrt" not in p.name)
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "from edge.cli import build_parser; build_parser()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'tensorrt', 'pycuda'))\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(modules) > 10
