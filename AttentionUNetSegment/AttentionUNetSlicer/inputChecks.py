"""What may be segmented: input volumes, ROIs, the domain guard before Apply."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, List

import slicer
import vtk
from slicer.i18n import tr as _

from AttentionUNetSlicer.definitions import ATTRIBUTE_PREFIX, AttentionUNetSegmentError

if TYPE_CHECKING:  # annotations only: the engine's bundle module loads on first use
    from AttentionUNetSegmentLib.model.bundle import ModelBundle


class InputChecks:
    """Logic part: input volumes, ROI boxes and the domain guard."""

    def domainWarnings(self, volumeNode, bundle: ModelBundle, roi=None, locateAutomatically: bool = True
                       ) -> List[str]:
        """The domain guard (``domain.domain_warnings``) for segmenting ``volumeNode``, or the part of it in
        ``roi``, with ``bundle``: what differs from the training data and what to do; empty when it looks alike
        or the bundle records no domain. Uses the volume's own grid (what the engine is given): sizes and spacings
        along i, j, k with the matching IJK-to-RAS direction columns."""
        # the localiser cuts the model's field of view out of the volume: only the other checks apply
        localizes = self.hasLocalizer(bundle) and locateAutomatically and not roi
        return self._domainCheck(volumeNode, bundle, roi, fieldOfView=not localizes)

    def willLocalize(self, volumeNode, bundle: ModelBundle, roi=None, locateAutomatically: bool = True) -> bool:
        """Whether the engine will locate the structure (``--localize auto``): the model has a localiser, no
        Region is chosen and the volume's field of view exceeds the model's (the engine's own test)."""
        from AttentionUNetSegmentLib.preprocessing.domain import exceeds_field_of_view

        image = volumeNode.GetImageData()
        if not (self.hasLocalizer(bundle) and locateAutomatically and not roi and image is not None):
            return False
        domain = bundle.metadata.get("domain")
        patchMm = [p * s for p, s in zip(bundle.patch_size, bundle.preprocessing.target_spacing)]
        try:
            return exceeds_field_of_view(list(image.GetDimensions()), volumeNode.GetSpacing(),
                                         self._ijkToRasDirection(volumeNode),
                                         domain if isinstance(domain, dict) else None, patchMm)
        except (KeyError, TypeError, ValueError):
            return False  # the domain record is unreadable: domainWarnings says so

    @staticmethod
    def _ijkToRasDirection(volumeNode) -> List[float]:
        """The volume's IJK-to-RAS direction cosines, row-major (the domain guard uses their absolute values, so
        RAS vs LPS signs do not matter; the i, j, k column order does)."""
        directions = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASDirectionMatrix(directions)
        return [directions.GetElement(r, c) for r in range(3) for c in range(3)]

    def _domainCheck(self, volumeNode, bundle: ModelBundle, roi, fieldOfView: bool) -> List[str]:
        """``domain_warnings`` on the volume's grid (or the ROI's part of it); ``fieldOfView=False`` skips the
        field-of-view check."""
        from AttentionUNetSegmentLib.preprocessing.domain import domain_warnings

        domain = bundle.metadata.get("domain")
        image = volumeNode.GetImageData()
        if not isinstance(domain, dict) or image is None:
            return []
        size = self._roiIndexSize(roi, volumeNode) if roi else list(image.GetDimensions())
        try:
            if not fieldOfView:
                domain = {**domain, "thresholds": {**dict(domain.get("thresholds") or {}),
                                                   "field_of_view_ratio": math.inf}}
            return domain_warnings(size, volumeNode.GetSpacing(), self._ijkToRasDirection(volumeNode), domain,
                                   localizer=self.hasLocalizer(bundle))
        except (KeyError, TypeError, ValueError) as error:
            return [_("the model '{model}' records its training domain in a form this version cannot read "
                      "({error}); the input cannot be checked against it").format(model=bundle.name,
                                                                                 error=repr(error))]

    def _roiIndexSize(self, roiNode, volumeNode) -> List[int]:
        """Voxels along i, j, k of the part of the volume's grid that holds the ROI (what the engine crops)."""
        box = self.roiBoxInVolumeCoordinates(roiNode, volumeNode)
        rasToIjk = vtk.vtkMatrix4x4()
        volumeNode.GetRASToIJKMatrix(rasToIjk)
        corners = [rasToIjk.MultiplyPoint([r, a, s, 1.0])[:3]
                   for r in box[0:2] for a in box[2:4] for s in box[4:6]]
        dims = volumeNode.GetImageData().GetDimensions()
        return [max(1, min(dims[axis], math.ceil(max(c[axis] for c in corners)) + 1)
                    - max(0, math.floor(min(c[axis] for c in corners)))) for axis in range(3)]

    def currentVolume(self):
        """The volume shown in the slice views (the panel's default input), else the last scalar volume."""
        selection = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSelectionNode")
        if selection is not None and selection.GetActiveVolumeID():
            node = slicer.mrmlScene.GetNodeByID(selection.GetActiveVolumeID())
            if node is not None and self.isInputVolume(node):
                return node
        volumes = self.allInputVolumes()
        return volumes[-1] if volumes else None

    def allInputVolumes(self) -> List[Any]:
        """Every volume that can be segmented (see ``isInputVolume``), in scene order."""
        return [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if self.isInputVolume(node)]

    @staticmethod
    def isInputVolume(node) -> bool:
        """An intensity volume: not a label map, and not one of this module's outputs (attention and probability
        maps are scalar volumes too, but segmenting them makes no sense)."""
        return (node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
                and not node.GetAttribute(ATTRIBUTE_PREFIX + "Role"))

    @staticmethod
    def segmentationBelongsTo(segmentationNode, volumeNode) -> bool:
        """Whether ``segmentationNode``'s reference geometry is ``volumeNode`` (as for a result of segmenting it)."""
        reference = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
        return reference is not None and reference.GetID() == volumeNode.GetID()

    @staticmethod
    def inputProblem(volumeNode) -> str:
        """Why ``volumeNode`` is not an input by its kind (see ``isInputVolume``): empty when it is one."""
        name = volumeNode.GetName()
        role = volumeNode.GetAttribute(ATTRIBUTE_PREFIX + "Role")
        if role:
            return _("'{name}' is a {role} map this module made, not an image: choose the volume it was made "
                     "from, or another scalar volume.").format(name=name, role=role)
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            return _("'{name}' is a {nodeClass}, not an intensity image: choose a scalar volume.").format(
                name=name, nodeClass=volumeNode.GetClassName())
        return ""

    def validateInputVolume(self, volumeNode) -> None:
        """Raise ``AttentionUNetSegmentError`` (what is wrong + how to fix it) unless the volume can be segmented."""
        if volumeNode is None:
            raise AttentionUNetSegmentError(_("No input volume: choose the volume to segment in Inputs > Volume."))
        name = volumeNode.GetName()
        problem = self.inputProblem(volumeNode)
        if problem:
            raise AttentionUNetSegmentError(problem)
        image = volumeNode.GetImageData()
        if image is None or image.GetNumberOfPoints() == 0:
            raise AttentionUNetSegmentError(_("'{name}' has no voxels: load the image data first.").format(name=name))
        components = image.GetNumberOfScalarComponents()
        if components != 1 or volumeNode.IsA("vtkMRMLVectorVolumeNode"):
            raise AttentionUNetSegmentError(
                _("'{name}' has {components} components per voxel (RGB, vector or 4D data); the model needs one "
                  "grey value per voxel. Convert it with the 'Vector to Scalar Volume' module, or pick one "
                  "frame.").format(name=name, components=components))
        dims = image.GetDimensions()
        if min(dims) < 2:
            raise AttentionUNetSegmentError(
                _("'{name}' is 2D ({i} x {j} x {k} voxels); the model segments 3D volumes.").format(
                    name=name, i=dims[0], j=dims[1], k=dims[2]))
        transform = volumeNode.GetParentTransformNode()
        if transform is not None and not transform.IsTransformToWorldLinear():
            raise AttentionUNetSegmentError(
                _("'{name}' is under the non-linear transform '{transform}'. Harden the transform on the volume "
                  "(Data module: right-click > Harden transform) or remove it, then run again.").format(
                      name=name, transform=transform.GetName()))

    @staticmethod
    def roiBoxInVolumeCoordinates(roiNode, volumeNode) -> List[float]:
        """The ROI as a RAS box ``[R_MIN, R_MAX, A_MIN, A_MAX, S_MIN, S_MAX]`` in the volume's own coordinates
        (what the engine sees when the volume sits under a linear transform); raises if it misses the volume."""
        worldBounds = [0.0] * 6
        roiNode.GetRASBounds(worldBounds)
        corners = []
        for r in worldBounds[0:2]:
            for a in worldBounds[2:4]:
                for s in worldBounds[4:6]:
                    local = [0.0, 0.0, 0.0]
                    volumeNode.TransformPointFromWorld([r, a, s], local)
                    corners.append(local)
        box = []
        for axis in range(3):
            box += [min(c[axis] for c in corners), max(c[axis] for c in corners)]
        volumeBounds = [0.0] * 6
        volumeNode.GetBounds(volumeBounds)
        if any(box[2 * a] > volumeBounds[2 * a + 1] or box[2 * a + 1] < volumeBounds[2 * a] for a in range(3)):
            raise AttentionUNetSegmentError(
                _("The ROI '{roi}' does not overlap '{volume}': move the ROI onto the volume, or clear the ROI to "
                  "segment the whole volume.").format(roi=roiNode.GetName(), volume=volumeNode.GetName()))
        return box
