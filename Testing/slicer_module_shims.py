"""Import ``AttentionUNetSegment.py`` outside the Slicer application, on the real MRML of ``slicer-core``.

``slicer-core`` (PyPI, Kitware) provides the real ``vtkMRMLScene``, volume/segmentation/storage nodes,
``vtkSlicerSegmentationsModuleLogic`` and ``slicer.util``; it lacks Qt/CTK, ``slicer.app``, the
``ScriptedLoadableModule`` base classes and ``parameterNodeWrapper``. Only those missing pieces are stood in for
here (minimal, behaviour-free): every Logic code path under test runs on real MRML objects.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path

MODULE_FILE = Path(__file__).resolve().parents[1] / "AttentionUNetSegment" / "AttentionUNetSegment.py"


def install_missing_modules() -> None:
    import slicer

    if "qt" not in sys.modules:
        sys.modules["qt"] = types.ModuleType("qt")  # used by the Widget only (QTimer)

    if "slicer.ScriptedLoadableModule" not in sys.modules:
        base = types.ModuleType("slicer.ScriptedLoadableModule")

        class ScriptedLoadableModule:
            def __init__(self, parent):
                self.parent = parent

        class ScriptedLoadableModuleWidget:
            def __init__(self, parent=None):
                self.parent = parent

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None):
                self.moduleName = type(self).__name__.replace("Logic", "")

        class ScriptedLoadableModuleTest(unittest.TestCase):
            def delayDisplay(self, message, msec=100):
                pass  # no GUI to show the message in

        for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                    ScriptedLoadableModuleTest):
            setattr(base, cls.__name__, cls)
        sys.modules[base.__name__] = base
        slicer.ScriptedLoadableModule = base

    if "slicer.parameterNodeWrapper" not in sys.modules:
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")

        class _Annotation:
            def __init__(self, *args, **kwargs):
                self.args = args

        wrapper.parameterNodeWrapper = lambda cls: cls
        wrapper.Choice = type("Choice", (_Annotation,), {})
        wrapper.WithinRange = type("WithinRange", (_Annotation,), {})
        sys.modules[wrapper.__name__] = wrapper
        slicer.parameterNodeWrapper = wrapper


def load_module(scene=None):
    """The ``AttentionUNetSegment`` module object, with ``slicer.mrmlScene`` set to ``scene`` (a new scene by
    default)."""
    import slicer

    install_missing_modules()
    slicer.mrmlScene = scene if scene is not None else slicer.vtkMRMLScene()
    if "AttentionUNetSegment" in sys.modules:
        return sys.modules["AttentionUNetSegment"]
    spec = importlib.util.spec_from_file_location("AttentionUNetSegment", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["AttentionUNetSegment"] = module
    spec.loader.exec_module(module)
    return module
