"""The module's entry file (``AttentionUNetSegment.py``) and what Slicer does with it, on real MRML: reading it
before the Markups and Segmentations modules have loaded, Reload, the self-test without torch, one parameter-node
wrapper per node, the module's own maps refused as inputs, install progress before an installation blocks."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import unittest
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")

from slicer_module_shims import install_missing_modules, load_module  # noqa: E402

install_missing_modules()
from AttentionUNetSlicer import definitions, dependencies, jobs  # noqa: E402
from test_slicer_logic import _add_volume, _fake_packaging, _node_ids, _oblique_image  # noqa: E402

TESTING = Path(__file__).resolve().parent


def test_the_module_file_reads_before_the_markups_and_segmentations_classes_are_in_slicer():
    """Slicer reads every module's file before it loads the modules whose MRML classes ``slicer`` then exposes:
    nothing at module scope may need ``slicer.vtkMRMLMarkupsROINode`` or ``slicer.vtkMRMLSegmentationNode``; the
    parameter node class is made when the panel first asks for it."""
    code = (
        f"import sys; sys.path.insert(0, {str(TESTING)!r})\n"
        "import slicer\n"
        "hidden = {name: getattr(slicer, name) for name in ('vtkMRMLMarkupsROINode', 'vtkMRMLSegmentationNode')}\n"
        "for name in hidden: delattr(slicer, name)\n"
        "from slicer_module_shims import load_module\n"
        "module = load_module()\n"
        "for name, value in hidden.items(): setattr(slicer, name, value)\n"
        "wrapper = module.AttentionUNetSegmentLogic().getParameterNode()\n"
        "print(type(wrapper).__annotations__['roi'].__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "vtkMRMLMarkupsROINode"


def test_one_parameter_node_wrapper_per_node():
    """The panel binds its widgets once per wrapper: the Logic gives the same wrapper while the node is the same
    (Slicer 5.8 cannot undo a second ``connectGui``), a new one for a new node."""
    module = load_module(slicer.vtkMRMLScene())
    logic = module.AttentionUNetSegmentLogic()
    first = logic.getParameterNode()
    assert logic.getParameterNode() is first
    assert first.parameterNode.GetAttribute("ModuleName") == "AttentionUNetSegment"
    slicer.mrmlScene.RemoveNode(first.parameterNode)
    second = logic.getParameterNode()
    assert second is not first and second.parameterNode is not first.parameterNode


def test_reload_imports_the_slicer_package_and_the_engine_afresh():
    """Developer mode's Reload (the shim's ``onReload`` re-executes the module file, as Slicer's does): the Slicer
    package and the engine modules it runs in Slicer's process (bundle, outputs, report, file I/O) are imported
    again, so an edit to any of them takes effect without restarting Slicer."""
    engine = ("AttentionUNetSegmentLib.model.bundle", "AttentionUNetSegmentLib.inference.outputs",
              "AttentionUNetSegmentLib.fileio.imageio")  # what the scene import and export use in Slicer's process
    for name in engine:
        importlib.import_module(name)
    packages = ("AttentionUNetSegment", "AttentionUNetSlicer", "AttentionUNetSegmentLib")
    module = load_module(slicer.vtkMRMLScene())
    loaded = {name: mod for name, mod in sys.modules.items() if name.split(".")[0] in packages}
    try:
        widget = module.AttentionUNetSegmentWidget.__new__(module.AttentionUNetSegmentWidget)
        widget.onReload()
        for name in ("AttentionUNetSlicer.logic", "AttentionUNetSegmentLib.errors"):
            assert sys.modules[name] is not loaded[name], name
        for name in engine:  # dropped, so imported afresh on first use
            assert name not in sys.modules or sys.modules[name] is not loaded[name], name
        reloaded = sys.modules["AttentionUNetSegment"]
        assert reloaded.AttentionUNetSegmentLogic is sys.modules["AttentionUNetSlicer.logic"].AttentionUNetSegmentLogic
        fresh = sys.modules["AttentionUNetSlicer.definitions"].AttentionUNetSegmentError
        assert issubclass(fresh, sys.modules["AttentionUNetSegmentLib.errors"].AttentionUNetError)
    finally:  # the other tests keep the modules they imported, and only those
        for name in [name for name in sys.modules if name.split(".")[0] in packages]:
            del sys.modules[name]
        sys.modules.update(loaded)


def test_self_test_skips_the_inference_cleanly_without_torch(monkeypatch):
    """ctest on the extension factory: the PyTorch extension brings PyTorchUtils, not torch, and testing mode
    installs nothing. The self-test then skips the inference and still runs the rest."""
    module = load_module(slicer.vtkMRMLScene())
    for name in ("torch", "safetensors"):
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without them gives find_spec
    outcome = unittest.TextTestRunner(stream=io.StringIO()).run(
        unittest.defaultTestLoader.loadTestsFromTestCase(module.AttentionUNetSegmentTest))
    assert outcome.wasSuccessful(), [str(e[1]) for e in outcome.errors + outcome.failures]
    assert outcome.testsRun == 2
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0  # nothing was segmented


def test_the_modules_own_maps_are_refused_as_inputs(tiny_bundle):
    """An attention or probability map (a scalar volume carrying the module's role attribute) is refused by the
    run itself, with what to choose instead; nothing is added to the scene."""
    load_module(slicer.vtkMRMLScene())
    from AttentionUNetSlicer.logic import AttentionUNetSegmentLogic

    logic = AttentionUNetSegmentLogic()
    scene = slicer.mrmlScene
    attention = _add_volume(scene, "Case attention 0", _oblique_image())
    attention.SetAttribute(definitions.ATTRIBUTE_PREFIX + "Role", "attention")
    assert not logic.isInputVolume(attention)
    before = _node_ids(scene)
    with pytest.raises(definitions.AttentionUNetSegmentError, match="attention map this module made"):
        logic.process(attention, options=jobs.SegmentationOptions(model=str(tiny_bundle.path)))
    assert _node_ids(scene) == before
    rows = logic.processBatch([attention], jobs.SegmentationOptions(model=str(tiny_bundle.path)))
    assert rows.GetCellText(0, 1) == "skipped" and "attention map" in rows.GetCellText(0, 2)


@pytest.mark.parametrize("release", ["5.12 (slicer.packaging)", "5.10 (pip_install)"])
def test_install_progress_is_shown_after_asking_and_before_the_installation_blocks(monkeypatch, tmp_path, release):
    """The user is asked first; only then does the panel's status line say what is being installed, before the
    installation starts (it blocks for minutes)."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("attention-unet-no-such-package>=1.0\n", encoding="utf-8")
    monkeypatch.setattr(dependencies, "REQUIREMENTS_FILE", requirements)
    events = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: events.append("asked") or True,
                        raising=False)
    if release.startswith("5.12"):
        _fake_packaging(monkeypatch, lambda requirements, **kwargs: events.append("installed"))
    else:
        monkeypatch.setitem(sys.modules, "slicer.packaging", None)
        monkeypatch.delattr(slicer, "packaging", raising=False)
        monkeypatch.setattr(slicer.util, "pip_install", lambda requirements: events.append("installed"),
                            raising=False)
    load_module(slicer.vtkMRMLScene())
    from AttentionUNetSlicer.logic import AttentionUNetSegmentLogic

    AttentionUNetSegmentLogic().ensureDependencies(statusCallback=events.append)
    assert events == ["asked", "Installing attention-unet-no-such-package>=1.0; this can take several minutes...",
                      "installed"]
