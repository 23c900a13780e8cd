"""Import ``AttentionUNetSegment.py`` outside the Slicer application, on the real MRML of ``slicer-core``.

``slicer-core`` (PyPI, Kitware) provides the real ``vtkMRMLScene``, volume/segmentation/storage nodes,
``vtkSlicerSegmentationsModuleLogic`` and ``slicer.util``; it lacks Qt/CTK, ``slicer.app``, the
``ScriptedLoadableModule`` base classes, ``parameterNodeWrapper`` and ``slicer.i18n``, and its
``slicer.util.tempDirectory`` needs Qt. Only those missing pieces are stood in for here (minimal, with the behaviour
of Slicer's own that the module relies on, named at each): every Logic code path under test runs on real MRML
objects.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import types
import unittest
from pathlib import Path

MODULE_FILE = Path(__file__).resolve().parents[1] / "AttentionUNetSegment" / "AttentionUNetSegment.py"


def install_missing_modules() -> None:
    import slicer

    # Slicer puts each scripted module's folder on sys.path, so the entry file imports AttentionUNetSlicer.
    if str(MODULE_FILE.parent) not in sys.path:
        sys.path.insert(0, str(MODULE_FILE.parent))

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
                self.moduleName = type(self).__name__.replace("Widget", "")

            def onReload(self):
                """``slicer.util.reloadScriptedModule``: execute the module's file again, nothing else."""
                _execute_module_file()

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None):
                self.moduleName = type(self).__name__.replace("Logic", "")

            def getParameterNode(self):
                """Slicer's: the scene's one ``vtkMRMLScriptedModuleNode`` tagged with the module name."""
                scene = slicer.mrmlScene
                for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
                    node = scene.GetNthNodeByClass(index, "vtkMRMLScriptedModuleNode")
                    if node.GetAttribute("ModuleName") == self.moduleName:
                        return node
                node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
                node.SetAttribute("ModuleName", self.moduleName)
                return node

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

        def parameterNodeWrapper(cls):
            """The decorated class wraps a parameter node, reachable as ``.parameterNode`` (as Slicer's does)."""
            def __init__(self, parameterNode):
                self.parameterNode = parameterNode

            return type(cls.__name__, (), {"__init__": __init__, "__doc__": cls.__doc__,
                                           "__annotations__": cls.__annotations__})

        wrapper.parameterNodeWrapper = parameterNodeWrapper
        wrapper.Choice = type("Choice", (_Annotation,), {})
        wrapper.WithinRange = type("WithinRange", (_Annotation,), {})
        sys.modules[wrapper.__name__] = wrapper
        slicer.parameterNodeWrapper = wrapper

    if "slicer.i18n" not in sys.modules:
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text  # no translation loaded: the source text, as Slicer shows it
        i18n.translate = lambda context, text: text
        sys.modules[i18n.__name__] = i18n
        slicer.i18n = i18n

    # slicer-core's tempDirectory builds its path with Qt; Slicer's makes a new folder in the temporary folder
    # named after the key and the time.
    slicer.util.tempDirectory = lambda key="__SlicerTemp__", tempDir=None, includeDateTime=True: tempfile.mkdtemp(
        prefix=key, dir=tempDir or TEMPORARY_PATH[0])


#: Slicer's temporary folder (``slicer.app.temporaryPath``) for ``tempDirectory``; ``None``: the system's.
TEMPORARY_PATH = [None]


def _execute_module_file():
    spec = importlib.util.spec_from_file_location("AttentionUNetSegment", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["AttentionUNetSegment"] = module
    spec.loader.exec_module(module)
    return module


def load_module(scene=None):
    """The ``AttentionUNetSegment`` module object, with ``slicer.mrmlScene`` set to ``scene`` (a new scene by
    default)."""
    import slicer

    install_missing_modules()
    slicer.mrmlScene = scene if scene is not None else slicer.vtkMRMLScene()
    if "AttentionUNetSegment" in sys.modules:
        return sys.modules["AttentionUNetSegment"]
    return _execute_module_file()
