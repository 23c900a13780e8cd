"""The engine stays pure Python: it runs inside Slicer's Python and outside it, so it never imports Slicer's or
Qt's modules (the Slicer layer passes MRML data to it as files or numpy arrays), nor the Slicer side's own package
``AttentionUNetSlicer`` (which imports the engine, never the other way round)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import AttentionUNetSegmentLib

FORBIDDEN = ("slicer", "qt", "ctk", "vtk", "mrml", "AttentionUNetSlicer")


def test_importing_every_engine_module_loads_no_slicer_qt_ctk_vtk_or_slicer_package():
    modules = [m.name for m in pkgutil.walk_packages(AttentionUNetSegmentLib.__path__, "AttentionUNetSegmentLib.")
               if m.name != "AttentionUNetSegmentLib.__main__"]  # that one runs the CLI
    assert {"AttentionUNetSegmentLib.inference.predictor", "AttentionUNetSegmentLib.training.trainer",
            "AttentionUNetSegmentLib.cli.main"} <= set(modules)
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
