"""AttentionUNetSegment: 3D Attention U-Net segmentation with attention maps, as a 3D Slicer module.

The network runs out of process through the engine's command line (``PythonSlicer -m AttentionUNetSegmentLib
segment ... --progress json``), so the GUI stays responsive and Cancel is a clean process termination. Results are
read back into the scene on the main thread only when the engine has finished: a cancelled or failed run leaves the
scene as it was. Torch is never imported at module scope. This file registers the module; the work is done in the
``AttentionUNetSlicer`` package (one concern per file).
"""

import hashlib
import sys
from typing import List

import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from AttentionUNetSlicer.definitions import (
    CONTRIBUTORS,
    DEFAULT_MODEL,
    RESOURCES_DIR,
    SAMPLE_DATA_DIR,
    AttentionUNetSegmentError,
)
from AttentionUNetSlicer.dependencies import moduleAvailable
from AttentionUNetSlicer.jobs import SegmentationOptions
from AttentionUNetSlicer.logic import AttentionUNetSegmentLogic
from AttentionUNetSlicer.segmentStatistics import voxelCounts
from AttentionUNetSlicer.widget import PanelWidget


#
# AttentionUNetSegment
#


class AttentionUNetSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Attention U-Net Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = list(CONTRIBUTORS)
        self.parent.helpText = _(
            "Segment a 3D volume with a 3D Attention U-Net and show where the network looked (attention maps). "
            "Choose the input volume and a model, then click Apply. See the "
            "<a href='https://github.com/AttentionUNet/SlicerAttentionUNet#using-the-3d-slicer-module'>"
            "user guide</a>.")
        self.parent.acknowledgementText = _(
            "Attention U-Net: Oktay et al., 'Attention U-Net: Learning Where to Look for the Pancreas', MIDL 2018. "
            "The bundled hippocampus model was trained on the Medical Segmentation Decathlon Task04 (CC-BY-SA 4.0) and "
            "on crops of five NiChart_Project demo heads (CBICA, University of Pennsylvania).")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the bundled sample volume with the Sample Data module."""
    import SampleData

    samples = sorted(SAMPLE_DATA_DIR.glob("*.nii.gz"))
    if not samples:
        return
    sample = samples[0]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="AttentionUNet",
        sampleName="AttentionUNetHippocampus",
        thumbnailFileName=str(RESOURCES_DIR / "Icons" / "AttentionUNetSegment.png"),
        uris=sample.as_uri(),
        fileNames=sample.name,
        checksums=f"SHA256:{hashlib.sha256(sample.read_bytes()).hexdigest()}",
        nodeNames="AttentionUNetHippocampus",
    )


#
# AttentionUNetSegmentWidget
#

#: The packages whose modules Reload imports afresh: the Slicer package and the engine it uses in-process.
RELOADED_PACKAGES = ("AttentionUNetSlicer", "AttentionUNetSegmentLib")



class AttentionUNetSegmentWidget(PanelWidget):
    """The module panel (``AttentionUNetSlicer.widget``)."""

    def onReload(self) -> None:
        """Developer mode's Reload re-reads only this file: forget the Slicer package's modules and the engine's
        (its bundle, outputs, report and file modules run in Slicer's process too) so that they are imported
        afresh as well."""
        for name in [name for name in sys.modules if name.split(".")[0] in RELOADED_PACKAGES]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)


#
# AttentionUNetSegmentTest
#


class AttentionUNetSegmentTest(ScriptedLoadableModuleTest):
    """Runs the real Logic on the bundled sample with the bundled model (CPU). Where torch or safetensors are
    missing (Slicer's extension build: the PyTorch extension brings PyTorchUtils, not torch, and testing mode
    installs nothing) the inference is skipped and the rest still runs."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentSample()
        self.setUp()
        self.test_BadInput()

    def _loadSample(self):
        samples = sorted(SAMPLE_DATA_DIR.glob("*.nii.gz"))
        self.assertTrue(samples, f"no sample volume in {SAMPLE_DATA_DIR}")
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "AttentionUNetHippocampus")
        AttentionUNetSegmentLogic._readVolumeFile(samples[0], volume)
        volume.CreateDefaultDisplayNodes()
        return volume

    def test_SegmentSample(self):
        volume = self._loadSample()
        logic = AttentionUNetSegmentLogic()
        bundle = logic.resolveModel(DEFAULT_MODEL)
        self.assertTrue(logic.isInputVolume(volume) and bundle.labels)
        missing = [name for name in ("torch", "safetensors") if not moduleAvailable(name)]
        if missing:
            self.delayDisplay(f"Inference skipped: {', '.join(missing)} not installed")
            return
        self.delayDisplay("Segmenting the bundled sample")
        result = logic.process(volume, options=SegmentationOptions(device="cpu"))

        segments = result.segmentation.GetSegmentation()
        self.assertEqual(segments.GetNumberOfSegments(), len(bundle.labels))
        for index, label in enumerate(bundle.labels):
            segment = segments.GetNthSegment(index)
            self.assertEqual(segment.GetName(), label.name)
            self.assertEqual(segment.GetLabelValue(), label.value)

        # No reference volume passed: the export uses the segmentation's own reference geometry, which the run must
        # have set to the input's grid.
        self.assertTrue(logic.segmentationBelongsTo(result.segmentation, volume))
        labelmap = logic.exportToLabelMapNode(result.segmentation)
        self.assertEqual(labelmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        for actual, expected in zip(_ijkToRas(labelmap), _ijkToRas(volume)):
            self.assertAlmostEqual(actual, expected, places=4)
        self.assertGreater(sum(voxelCounts(labelmap).values()), 0, "the model found nothing in the sample")

        self.assertGreaterEqual(len(result.attentionVolumes), 1)
        volumeBounds = [0.0] * 6
        volume.GetRASBounds(volumeBounds)
        for attention in result.attentionVolumes:
            self.assertEqual(attention.GetAttribute("AttentionUNet.Model"), bundle.name)
            bounds = [0.0] * 6
            attention.GetRASBounds(bounds)
            for axis in range(6):  # the coarse grid covers the same physical box (within a coarse voxel)
                self.assertAlmostEqual(bounds[axis], volumeBounds[axis], delta=max(attention.GetSpacing()) * 1.01)
            values = slicer.util.arrayFromVolume(attention)
            self.assertGreaterEqual(float(values.min()), 0.0)
            self.assertLessEqual(float(values.max()), 1.0)
        self.delayDisplay("Sample segmented")

    def test_BadInput(self):
        logic = AttentionUNetSegmentLogic()
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(AttentionUNetSegmentError):
            logic.process(None)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)


def _ijkToRas(volumeNode) -> List[float]:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return [matrix.GetElement(r, c) for r in range(3) for c in range(4)]
