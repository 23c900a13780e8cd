"""The panel's state saved with the scene (``parameterNodeWrapper``)."""

import pathlib
from typing import Annotated

from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from AttentionUNetSlicer.definitions import DEFAULT_MODEL, DEVICES, MAX_OVERLAP, OUTPUT_FORMATS


@parameterNodeWrapper
class AttentionUNetSegmentParameterNode:
    """Panel state, saved with the scene (``SlicerParameterName`` in the .ui binds each widget to a field)."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = DEFAULT_MODEL
    roi: vtkMRMLMarkupsROINode
    locateAutomatically: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
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
