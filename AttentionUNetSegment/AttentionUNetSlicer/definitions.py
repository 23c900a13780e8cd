"""Names the Slicer package shares: resource paths, node attributes and reference roles, the user-facing
error class."""

from __future__ import annotations

import pathlib

# The engine's single definitions (these two modules import nothing, so Slicer's start-up stays light).
from AttentionUNetSegmentLib.constants import DEFAULT_MODEL, DEVICES, OUTPUT_FORMATS  # noqa: F401
from AttentionUNetSegmentLib.errors import AttentionUNetError

#: Who made the module, as Slicer shows it ("Name (Organisation)"); the extension's CMakeLists.txt and
#: AttentionUNet.s4ext carry the same line.
CONTRIBUTORS = ("AttentionUNet maintainers (SlicerAttentionUNet project)",)
MODULE_DIR = pathlib.Path(__file__).resolve().parents[1]  # the module folder
RESOURCES_DIR = MODULE_DIR / "Resources"
SAMPLE_DATA_DIR = RESOURCES_DIR / "SampleData"
REQUIREMENTS_FILE = RESOURCES_DIR / "requirements.txt"
#: What Export > DICOM SEG needs besides (highdicom, pydicom: the engine's [dicom] extra), installed on first use.
DICOM_REQUIREMENTS_FILE = RESOURCES_DIR / "requirements-dicom.txt"
#: Attribute of a volume loaded from the DICOM database: its SOP Instance UIDs, space-separated
#: (DICOMScalarVolumePlugin); a DICOM SEG of its segmentation references these instances.
DICOM_INSTANCE_UIDS = "DICOM.instanceUIDs"
#: What Export > Report (PDF) needs besides the engine's requirements (installed on its first use).
REPORT_REQUIREMENTS_FILE = RESOURCES_DIR / "requirements-report.txt"
#: Torch comes from the PyTorch extension (PyTorchUtils) with the right CUDA build, never from pip directly;
#: 2.3 is the first with the device-generic torch.amp.GradScaler that training uses.
TORCH_REQUIREMENT = ">=2.3"

#: Node attributes carrying provenance (model, version, sha256, device, parameters, date).
ATTRIBUTE_PREFIX = "AttentionUNet."
#: Node reference roles from a result segmentation to its attention / probability volumes and to the Markups ROI
#: boxes its run located the structure in (one per side).
ATTENTION_ROLE = "AttentionUNetAttention"
PROBABILITY_ROLE = "AttentionUNetProbability"
LOCALIZATION_BOX_ROLE = "AttentionUNetLocalizationBox"
#: Segment tag (and box attribute) naming the side of a located run's segment: one of SIDES.
SIDE_TAG = ATTRIBUTE_PREFIX + "Side"
SIDES = ("left", "right")
#: ``AttentionUNet.Role`` of the Markups ROI boxes a located run used.
BOX_ROLE = "localization box"
ATTENTION_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
#: Attention below this value is drawn transparent, so the overlay shows only where the network looked.
ATTENTION_DISPLAY_THRESHOLD = 0.05
ATTENTION_OPACITY = 0.4
#: Highest sliding-window overlap the panel offers.
MAX_OVERLAP = 0.9
#: The engine writes NRRD for the scene: exact direction cosines (NIfTI stores them as float32 quaternions).
ENGINE_FORMAT = "nrrd"
ENGINE_INPUT_STEM = "input"
POLL_INTERVAL_MS = 100


class AttentionUNetSegmentError(AttentionUNetError):
    """A problem the user can act on (what was wrong and how to fix it); shown as is in the panel. A kind of the
    engine's ``AttentionUNetError``: one root for every error the user can act on."""
