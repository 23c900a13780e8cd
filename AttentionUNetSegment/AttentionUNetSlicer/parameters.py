"""The panel's state saved with the scene (``parameterNodeWrapper``)."""

import pathlib
from typing import Annotated

import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from AttentionUNetSlicer.definitions import DEFAULT_MODEL, DEVICES, MAX_OVERLAP, OUTPUT_FORMATS

_parameterNodeClass = None


def parameterNodeClass():
    """The wrapper class of the module's parameter node, made on first use: the Markups ROI and segmentation node
    classes it names are in ``slicer`` only once the Markups and Segmentations modules have loaded, which Slicer
    does after it has read this module's files."""
    global _parameterNodeClass
    if _parameterNodeClass is None:

        @parameterNodeWrapper
        class AttentionUNetSegmentParameterNode:
            """Panel state, saved with the scene (``SlicerParameterName`` in the .ui binds each widget to a
            field)."""

            inputVolume: slicer.vtkMRMLScalarVolumeNode
            modelName: str = DEFAULT_MODEL
            roi: slicer.vtkMRMLMarkupsROINode
            locateAutomatically: bool = True
            outputSegmentation: slicer.vtkMRMLSegmentationNode
            attentionMaps: bool = True
            probabilityMaps: bool = False
            device: Annotated[str, Choice(list(DEVICES))] = "auto"
            overlap: Annotated[float, WithinRange(0.0, MAX_OVERLAP)] = 0.5
            testTimeAugmentation: bool = False
            largestComponent: bool = False
            exportDirectory: pathlib.Path
            exportFormat: Annotated[str, Choice(list(OUTPUT_FORMATS))] = "nii.gz"
            exportDicomSeg: bool = False
            batchAllVolumes: bool = False

        _parameterNodeClass = AttentionUNetSegmentParameterNode
    return _parameterNodeClass
