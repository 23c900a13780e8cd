"""Volumes to and from the engine's files, with Slicer's own readers and writers (ITK LPS <-> Slicer RAS)."""

from __future__ import annotations

import pathlib
import uuid

import slicer
from slicer.i18n import tr as _

from AttentionUNetSlicer.definitions import ENGINE_INPUT_STEM, AttentionUNetSegmentError


class VolumeFiles:
    """Logic part: writing a volume for the engine, reading an engine output into a node."""

    @staticmethod
    def writeVolumeForEngine(volumeNode, folder: pathlib.Path) -> pathlib.Path:
        """Write the volume (its own coordinates, uncompressed NRRD) for the engine; the scene is not touched."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ENGINE_INPUT_STEM}.nrrd"
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(0)
        if not storage.WriteData(volumeNode):
            raise AttentionUNetSegmentError(
                _("Could not write '{name}' to the temporary folder {folder}: check free disk space.").format(
                    name=volumeNode.GetName(), folder=folder))
        return path

    @staticmethod
    def _readVolumeFile(path: pathlib.Path, node) -> None:
        """Read an image file into ``node`` with Slicer's own reader (ITK LPS -> Slicer RAS handled there)."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise AttentionUNetSegmentError(_("Could not read the engine output {name}.").format(name=path.name))


def workDirectory(purpose: str) -> pathlib.Path:
    """A new folder for one engine run or export in Slicer's temporary folder (Application settings), which the
    caller removes when done. The random part keeps two runs started within the same millisecond apart (the
    folder name's time has millisecond resolution)."""
    return pathlib.Path(slicer.util.tempDirectory(f"AttentionUNet-{purpose}-{uuid.uuid4().hex[:8]}-"))
