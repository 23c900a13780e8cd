"""Model bundles (a directory with ``model.json`` + ``model.safetensors``) and the registry of installed models.

A bundle is self-describing: architecture, labels (values, names, colours), preprocessing, patch size, provenance,
the sha256 of its weights and a digest over the whole metadata (format in ``DESIGN.md``). Loading never executes
code from a model file: weights are read with safetensors only, after their sha256 has been checked, and
pickle-based checkpoints are refused. The digests detect corruption and a metadata file that no longer matches its
weights (e.g. hand-edited label names); they are no signature, so they cannot tell who made a bundle.

This module imports neither torch nor safetensors at module scope, so the Slicer panel (and ``attention-unet
models``) can list installed models without paying for, or needing, torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .. import __version__
from ..constants import DEFAULT_MODEL
from ..errors import ModelBundleError
from ..fileio.atomic import remove_stale_temporaries, replace_folder, temporary_path
from ..fileio.jsonfile import read_json
from ..preprocessing.preprocess import PreprocessingSpec

if TYPE_CHECKING:  # imported for annotations only; torch stays out of module scope
    import torch

    from ..preprocessing.localization import LocalizerSpec

    from .network import AttentionUNet

FORMAT = "attention-unet-bundle"
#: The newest format this engine reads. 2 added ``metadata_sha256`` (format_version 1 bundles without it still load,
#: with their weights checked only); 3 added ``weights.folds`` (fold ensembles, the only bundles written as 3, so
#: engines that predate folds refuse them as newer instead of misreading them).
FORMAT_VERSION = 3
#: What a single-weights bundle is written as.
SINGLE_WEIGHTS_FORMAT_VERSION = 2
#: The first format that may hold ``weights.folds``.
FOLDS_FORMAT_VERSION = 3
#: Most folds an ensemble bundle may hold (each one runs on every window).
MAX_FOLDS = 16
#: The key of the digest over the canonical metadata (``metadata_digest``).
DIGEST_KEY = "metadata_sha256"
METADATA_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
MODELS_ENV = "ATTENTION_UNET_MODELS"
#: The extension's ``AttentionUNetSegment/Resources`` (source tree, Slicer install), or the copy of its models and
#: sample that a wheel installs as ``AttentionUNetSegmentLib/resources``.
_PACKAGED_RESOURCES = Path(__file__).resolve().parents[1] / "resources"
RESOURCES_DIR = (_PACKAGED_RESOURCES if _PACKAGED_RESOURCES.is_dir()
                 else Path(__file__).resolve().parents[2] / "Resources")
#: Models shipped with the extension: ``<RESOURCES_DIR>/Models/<name>/``.
BUNDLED_MODELS_DIR = RESOURCES_DIR / "Models"

#: File types that hold pickled Python objects; loading one could run arbitrary code.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
_REQUIRED_KEYS = ("format", "format_version", "name", "version", "architecture", "labels", "preprocessing",
                  "inference", "weights")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Axes ``inference.mirror_axes`` may name: the canonical orientation's ITK axes (``x`` = last array axis).
MIRROR_AXES = ("x", "y", "z")
#: Largest label value: label maps are 16-bit signed (int16), which is also what 3D Slicer exports them as.
MAX_LABEL_VALUE = 32767
#: Largest ``model.json`` read: metadata is kilobytes; anything bigger is not a bundle this tool wrote.
MAX_METADATA_BYTES = 1 << 20
#: Architecture bounds: input channels the engine can feed (it segments scalar volumes), levels, widths, patch.
SUPPORTED_IN_CHANNELS = 1
MAX_DEPTH = 8
MAX_CHANNELS = 4096
MAX_PATCH_VOXELS_PER_AXIS = 1024
#: Largest estimated memory of one inference window (batch 1) plus the parameters (``estimate_memory``).
MAX_WINDOW_BYTES = 32 << 30
#: Digests of the bundles shipped in ``BUNDLED_MODELS_DIR``: a shipped bundle whose metadata does not hash to its pin
#: is refused, even when its own digests are consistent. ``finalize_hippocampus.py --refresh-digest`` updates this.
SHIPPED_DIGESTS = {
    "hippocampus": "f9bd233e88e7fd3d1db365db6abb149c9f9b531990f4756aba8ab903523ea195",
}

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class LabelInfo:
    """One segment the model predicts: label value in the output label map, display name, RGB colour in 0..1,
    and optionally a 3D Slicer terminology entry string (seven ``~``-separated parts, e.g.
    ``"<context>~SCT^123037004^Anatomical Structure~SCT^5976002^Hippocampus~^^~<anatomic context>~^^~^^"``)."""

    value: int
    name: str
    color: Tuple[float, float, float]
    terminology: str = ""
    #: ``"left"``/``"right"`` for the per-side segments of a localised run (``localization.labels``), else None.
    side: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        entry: Dict[str, Any] = {"value": self.value, "name": self.name, "color": list(self.color)}
        if self.terminology:
            entry["terminology"] = self.terminology
        if self.side:
            entry["side"] = self.side
        return entry


def _fail(directory: Path, problem: str, fix: str) -> ModelBundleError:
    return ModelBundleError(f"model bundle {directory}: {problem}; {fix}", problem=problem)


def _validate_labels(directory: Path, labels: Any, out_channels: int) -> None:
    if not isinstance(labels, list) or not labels:
        raise _fail(directory, "'labels' must be a non-empty list",
                    "list one {value, name, color} per foreground class")
    values, names = set(), set()
    for index, label in enumerate(labels):
        where = f"labels[{index}]"
        if not isinstance(label, dict) or not {"value", "name", "color"} <= set(label):
            raise _fail(directory, f"{where} must be an object with 'value', 'name' and 'color'",
                        "add the missing keys to model.json")
        value, name, color = label["value"], label["name"], label["color"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LABEL_VALUE:
            raise _fail(directory, f"{where}.value must be an integer in 1..{MAX_LABEL_VALUE} (label maps are "
                        f"16-bit signed), got {value!r}", "background (0) is implicit; number the segments from 1")
        if not isinstance(name, str) or not name.strip():
            raise _fail(directory, f"{where}.name must be a non-empty string", "give every segment a name")
        if (not isinstance(color, list) or len(color) != 3
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 <= c <= 1.0
                           for c in color)):
            raise _fail(directory, f"{where}.color must be three RGB numbers in 0..1, got {color!r}",
                        "write colours as floats, e.g. [0.9, 0.6, 0.2]")
        terminology = label.get("terminology", "")
        if (not isinstance(terminology, str) or any(c in terminology for c in "|\n")
                or (terminology and terminology.count("~") != 6)):
            raise _fail(directory, f"{where}.terminology must be a Slicer terminology entry string (seven "
                        "'~'-separated parts, no '|')", "copy it from Slicer's vtkSegment.GetTerminology()")
        if value in values or name in names:
            raise _fail(directory, f"{where} repeats value {value} or name {name!r}",
                        "label values and names must be unique")
        values.add(value)
        names.add(name)
    if len(labels) != out_channels - 1:
        raise _fail(directory, f"{len(labels)} labels listed but the architecture has out_channels={out_channels} "
                    f"(background + {out_channels - 1} classes)", "list exactly one label per foreground channel")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_ARCHITECTURE_KEYS = {"in_channels", "out_channels", "channels", "norm", "inter_channels_ratio", "deep_supervision"}


def _validate_architecture(directory: Path, architecture: Dict[str, Any]) -> None:
    """Bounds on what ``network.build_network`` receives, so a hostile bundle cannot ask for an absurd network."""
    fix = "copy the architecture the weights were trained with"
    unknown = sorted(set(architecture) - _ARCHITECTURE_KEYS)
    if unknown:
        raise _fail(directory, f"architecture has unknown keys {unknown}", f"allowed are {sorted(_ARCHITECTURE_KEYS)}")
    if architecture.get("in_channels") != SUPPORTED_IN_CHANNELS:
        raise _fail(directory, f"architecture.in_channels is {architecture.get('in_channels')!r}, but this engine "
                    f"feeds the network scalar volumes ({SUPPORTED_IN_CHANNELS} channel)",
                    "use a model trained on single-channel images")
    out_channels = architecture.get("out_channels")
    if not _is_int(out_channels) or not 2 <= out_channels <= MAX_LABEL_VALUE + 1:
        raise _fail(directory, f"architecture.out_channels must be an integer in 2..{MAX_LABEL_VALUE + 1} "
                    f"(background + the classes), got {out_channels!r}", fix)
    channels = architecture.get("channels")
    if (not isinstance(channels, list) or not 2 <= len(channels) <= MAX_DEPTH
            or not all(_is_int(c) and 1 <= c <= MAX_CHANNELS for c in channels)):
        raise _fail(directory, f"architecture.channels must be a list of 2..{MAX_DEPTH} integers in "
                    f"1..{MAX_CHANNELS} (the width of each level), got {channels!r}", fix)
    ratio = architecture.get("inter_channels_ratio", 0.25)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 4:
        raise _fail(directory, f"architecture.inter_channels_ratio must be a number in (0, 4], got {ratio!r}", fix)
    if architecture.get("norm", "instance") not in ("instance", "batch"):
        raise _fail(directory, f"architecture.norm must be 'instance' or 'batch', got {architecture.get('norm')!r}",
                    fix)
    if not isinstance(architecture.get("deep_supervision", False), bool):
        raise _fail(directory, "architecture.deep_supervision must be true or false", fix)


def parameter_count(architecture: Mapping[str, Any]) -> int:
    """Number of parameters of ``AttentionUNet(**architecture)`` (exact for instance norm), without torch."""
    channels = [int(c) for c in architecture["channels"]]
    out = int(architecture["out_channels"])
    ratio = float(architecture.get("inter_channels_ratio", 0.25))

    def conv_norm(c_in: int, c_out: int) -> int:  # 3x3x3 convolution without bias, affine norm
        return 27 * c_in * c_out + 2 * c_out

    count, previous = 0, int(architecture["in_channels"])
    for width in channels:
        count += conv_norm(previous, width) + conv_norm(width, width)
        previous = width
    for k in range(len(channels) - 1):
        inter = max(1, int(round(channels[k] * ratio)))
        count += (channels[k + 1] + 1) * inter + channels[k] * inter + inter + 1  # attention gate
        count += conv_norm(channels[k + 1], channels[k])  # upsampling convolution
        count += conv_norm(2 * channels[k], channels[k]) + conv_norm(channels[k], channels[k])  # decoder
    count += (channels[0] + 1) * out
    if architecture.get("deep_supervision"):
        count += sum((channels[k] + 1) * out for k in range(1, len(channels) - 1))
    return count


def estimate_memory(architecture: Mapping[str, Any], patch_size: Sequence[int], batch_size: int = 1,
                    training: bool = False, folds: int = 1) -> int:
    """Rough bytes (float32) of the parameters plus one forward pass over ``batch_size`` windows of
    ``patch_size`` voxels: inference keeps every level's skip plus a few full-resolution tensors; training keeps
    every intermediate for the backward pass (about 20 tensors per level) and AdamW's state (4 copies of the
    parameters). An ensemble of ``folds`` networks (inference) holds every fold's parameters and runs them one
    after the other on a window, plus one more output-sized sum per window. Python integers throughout, so absurd
    values give an absurd number, never an overflow."""
    channels = [int(c) for c in architecture["channels"]]
    out = int(architecture["out_channels"])
    per_level = [math.prod(max(1, int(p) // 2 ** k) for p in patch_size) for k in range(len(channels))]
    features = sum(width * voxels for width, voxels in zip(channels, per_level))
    if training:
        activations = 20 * features + 4 * out * per_level[0]
        parameters = 4 * parameter_count(architecture)
    else:
        activations = features + (8 * channels[0] + (2 if folds == 1 else 3) * out) * per_level[0]
        parameters = folds * parameter_count(architecture)
    return 4 * (batch_size * activations + parameters)


def device_memory(device: "torch.device") -> Optional[int]:
    """Bytes of memory on ``device``: the GPU's, or the machine's RAM (``None`` where unknown)."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def validate_metadata(metadata: Any, directory: Path) -> Dict[str, Any]:
    """Check ``model.json`` content against the bundle schema (no torch needed); returns it unchanged.

    Raises ``ModelBundleError`` naming the offending key and how to fix it.
    """
    if not isinstance(metadata, dict):
        raise _fail(directory, f"{METADATA_FILE} must hold a JSON object", "re-export the bundle with save_bundle")
    if metadata.get("format") != FORMAT:
        raise _fail(directory, f"'format' is {metadata.get('format')!r}, not {FORMAT!r}",
                    "this is not an AttentionUNet model bundle")
    version = metadata.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _fail(directory, f"'format_version' must be a positive integer, got {version!r}",
                    f"set it to {SINGLE_WEIGHTS_FORMAT_VERSION} ({FOLDS_FORMAT_VERSION} for a fold ensemble)")
    if version > FORMAT_VERSION:
        raise _fail(directory, f"format_version {version} is newer than this engine supports ({FORMAT_VERSION})",
                    f"upgrade the AttentionUNet engine (this is {__version__})")
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise _fail(directory, f"{METADATA_FILE} lacks required keys {missing}",
                    "re-export the bundle with save_bundle")
    for key in ("name", "version"):
        if not isinstance(metadata[key], str) or not metadata[key].strip():
            raise _fail(directory, f"'{key}' must be a non-empty string", f"set '{key}' in {METADATA_FILE}")
    if not _BUNDLE_NAME.match(metadata["name"]):
        raise _fail(directory, f"'name' {metadata['name']!r} has characters other than letters, digits, '.', '_', '-'",
                    "rename the model")
    for key in ("architecture", "preprocessing", "inference", "weights"):
        if not isinstance(metadata[key], dict):
            raise _fail(directory, f"'{key}' must be a JSON object", "re-export the bundle with save_bundle")
    architecture = metadata["architecture"]
    _validate_architecture(directory, architecture)
    _validate_labels(directory, metadata["labels"], architecture["out_channels"])
    try:
        PreprocessingSpec.from_dict(metadata["preprocessing"])
    except ModelBundleError as error:
        raise _fail(directory, str(error), "use the preprocessing the model was trained with") from None
    patch = metadata["inference"].get("patch_size")
    smallest = 2 ** (len(architecture["channels"]) - 1)
    if (not isinstance(patch, list) or len(patch) != 3
            or not all(_is_int(p) and smallest <= p <= MAX_PATCH_VOXELS_PER_AXIS for p in patch)):
        raise _fail(directory, f"inference.patch_size must be three integers (x, y, z) in {smallest}.."
                    f"{MAX_PATCH_VOXELS_PER_AXIS} (this network pools {len(architecture['channels']) - 1} times), "
                    f"got {patch!r}", "set the patch size the model was trained with")
    entries = _weight_entries(directory, metadata["weights"], version)
    needed = estimate_memory(architecture, patch, folds=len(entries))
    if needed > MAX_WINDOW_BYTES:
        raise _fail(directory, f"one inference window of patch {patch} with channels {architecture['channels']}"
                    + (f" ({len(entries)} folds)" if len(entries) > 1 else "")
                    + f" needs about {needed / 2**30:.1f} GiB, more than the {MAX_WINDOW_BYTES / 2**30:.0f} GiB a "
                    "bundle may ask for", "use a smaller patch size or fewer channels")
    overlap = metadata["inference"].get("overlap", 0.5)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise _fail(directory, f"inference.overlap must be a number in [0, 1), got {overlap!r}", "use e.g. 0.5")
    mirror = metadata["inference"].get("mirror_axes", [])
    if (not isinstance(mirror, list) or not all(axis in MIRROR_AXES for axis in mirror)
            or len(set(mirror)) != len(mirror)):
        raise _fail(directory, f"inference.mirror_axes must list distinct axes among {list(MIRROR_AXES)}, got "
                    f"{mirror!r}", "copy the flip axes the model was trained with (plan.json's flip_axes)")
    if DIGEST_KEY in metadata and (not isinstance(metadata[DIGEST_KEY], str)
                                   or not _SHA256.match(metadata[DIGEST_KEY])):
        raise _fail(directory, f"{DIGEST_KEY} must be 64 lower-case hex digits",
                    "re-export the bundle with save_bundle")
    return metadata


def _check_weight_entry(directory: Path, where: str, entry: Any) -> Dict[str, str]:
    """One weights file's ``{"file", "sha256"}`` (``where`` names it in messages: ``weights``, ``weights.folds[1]``)."""
    if not isinstance(entry, dict):
        raise _fail(directory, f"{where} must be an object with 'file' and 'sha256'", "re-export the bundle")
    file_name, digest = entry.get("file"), entry.get("sha256")
    if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in ("", ".", ".."):
        raise _fail(directory, f"{where}.file must be a plain file name inside the bundle, got {file_name!r}",
                    f"use {WEIGHTS_FILE!r}")
    if not file_name.endswith(".safetensors"):
        raise _fail(directory, f"{where}.file {file_name!r} is not a .safetensors file; pickle-based weights are "
                    "never loaded because they can execute code",
                    "convert the state_dict with safetensors.torch.save_file and re-export with save_bundle")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise _fail(directory, f"{where}.sha256 must be 64 lower-case hex digits",
                    "re-export the bundle with save_bundle")
    return entry


def _weight_entries(directory: Path, weights: Dict[str, Any], version: int) -> List[Dict[str, str]]:
    """The bundle's weights files, checked: ``[weights]`` for a single network, ``weights.folds`` for an ensemble
    (format_version 3: 2..``MAX_FOLDS`` distinct files, nothing else in ``weights``)."""
    if "folds" not in weights:
        return [_check_weight_entry(directory, "weights", weights)]
    if version < FOLDS_FORMAT_VERSION:
        raise _fail(directory, f"weights.folds needs format_version {FOLDS_FORMAT_VERSION}, the bundle says {version}",
                    "re-export the ensemble with `attention-unet ensemble`")
    folds = weights["folds"]
    if set(weights) != {"folds"} or not isinstance(folds, list) or not 2 <= len(folds) <= MAX_FOLDS:
        raise _fail(directory, f"weights.folds must be the only key of 'weights' and list 2..{MAX_FOLDS} "
                    "{file, sha256} objects, one per fold", "re-export the ensemble with `attention-unet ensemble`")
    entries = [_check_weight_entry(directory, f"weights.folds[{k}]", entry) for k, entry in enumerate(folds)]
    if len({entry["file"] for entry in entries}) != len(entries):
        raise _fail(directory, "weights.folds names a file twice", "give every fold its own weights file")
    return entries


def _bundle_directory(path: PathLike) -> Path:
    """The bundle directory for ``path`` (the directory itself or its ``model.json``)."""
    path = Path(path).expanduser()
    if path.is_file() and path.name == METADATA_FILE:
        return path.parent
    if path.is_dir():
        return path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelBundleError(f"{path} is a pickle-based checkpoint, which is never loaded because it can execute "
                               "code; export the model as a bundle directory with save_bundle")
    if path.is_file():
        raise ModelBundleError(f"{path} is not a model bundle: a bundle is a directory holding {METADATA_FILE} and "
                               f"{WEIGHTS_FILE}; pass that directory")
    raise ModelBundleError(f"model bundle {path} does not exist; pass an existing bundle directory or the name of "
                           "an installed model (see `attention-unet models`)")


def metadata_digest(metadata: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of ``metadata`` without ``DIGEST_KEY``. The
    metadata holds ``weights.sha256``, so this digest covers the weights too."""
    body = {key: value for key, value in metadata.items() if key != DIGEST_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _shipped_pin(directory: Path) -> Optional[str]:
    """The digest this engine pins for ``directory`` when it is one of the shipped bundles, else ``None``."""
    try:
        shipped = directory.resolve().parent == BUNDLED_MODELS_DIR.resolve()
    except OSError:
        return None
    return SHIPPED_DIGESTS.get(directory.name) if shipped else None


def _check_digest(directory: Path, metadata: Dict[str, Any]) -> None:
    """Refuse metadata that does not hash to its ``metadata_sha256`` (or, for a shipped bundle, to the pin)."""
    recorded = metadata.get(DIGEST_KEY)
    if recorded is None and metadata["format_version"] >= 2:
        raise _fail(directory, f"{METADATA_FILE} lacks {DIGEST_KEY}, which format_version "
                    f"{metadata['format_version']} bundles carry", "re-export the bundle with save_bundle")
    try:
        actual = metadata_digest(metadata)
    except (ValueError, RecursionError) as error:  # NaN/Infinity literals, nesting json cannot write back
        raise _fail(directory, f"{METADATA_FILE} cannot be put in canonical form ({type(error).__name__})",
                    "re-export the bundle with save_bundle") from None
    if recorded is not None and actual != recorded:
        raise _fail(directory, f"{METADATA_FILE} does not match its {DIGEST_KEY} (computed {actual[:12]}..., "
                    f"recorded {recorded[:12]}...): it was edited or damaged after the bundle was written",
                    "reinstall the bundle from its original source, or re-export it with save_bundle")
    pin = _shipped_pin(directory)
    if pin is not None and actual != pin:
        raise _fail(directory, f"this shipped model's {METADATA_FILE} hashes to {actual[:12]}..., not to the "
                    f"{pin[:12]}... this engine release pins", "reinstall the AttentionUNet extension")


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """Read and validate a bundle's ``model.json`` without touching its weights (and without torch): at most
    ``MAX_METADATA_BYTES``, a regular file, the schema, and the metadata digest."""
    directory = _bundle_directory(path)
    metadata_path = directory / METADATA_FILE
    if not (metadata_path.exists() or metadata_path.is_symlink()):
        raise _fail(directory, f"{METADATA_FILE} is missing", f"a bundle directory holds {METADATA_FILE} and "
                    f"{WEIGHTS_FILE}; re-export it with save_bundle")
    metadata = read_json(metadata_path, "model metadata", ModelBundleError, max_bytes=MAX_METADATA_BYTES)
    validate_metadata(metadata, directory)
    _check_digest(directory, metadata)
    return metadata


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelBundle:
    """A model bundle: validated metadata plus (lazily loaded, sha256-verified) weights.

    Construct through ``load_bundle`` (verifies everything now) or ``ModelRegistry.list`` (metadata only; the
    weights are verified the first time ``state_dicts`` is used). A fold ensemble holds one network per fold
    (``fold_count`` > 1), which ``inference.predictor.Predictor`` averages.
    """

    def __init__(self, metadata: Dict[str, Any], path: PathLike,
                 state_dicts: Optional[List[Dict[str, "torch.Tensor"]]] = None) -> None:
        self.path = Path(path)
        self.metadata = validate_metadata(metadata, self.path)
        self._state_dicts = state_dicts

    def __repr__(self) -> str:
        return f"ModelBundle(name={self.name!r}, version={self.version!r}, path={str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def version(self) -> str:
        return self.metadata["version"]

    @property
    def description(self) -> str:
        return self.metadata.get("description", "")

    @property
    def labels(self) -> List[LabelInfo]:
        """Foreground segments; ``labels[c - 1]`` is what output channel ``c`` predicts."""
        return [LabelInfo(int(item["value"]), str(item["name"]), tuple(float(c) for c in item["color"]),
                          item.get("terminology", "")) for item in self.metadata["labels"]]

    @property
    def domain(self) -> Optional[Dict[str, Any]]:
        """The training data's domain (``domain.measure_domain``), or None for bundles that do not record it."""
        return self.metadata.get("domain")

    @property
    def localization(self) -> Optional["LocalizerSpec"]:
        """The bundle's localiser (``localization.LocalizerSpec``), or None when it declares none."""
        if "localization" not in self.metadata:
            return None
        from ..preprocessing.localization import LocalizerSpec

        try:
            return LocalizerSpec.from_dict(self.metadata["localization"], self.path)
        except ValueError as error:
            raise _fail(self.path, str(error), "fix the 'localization' section or re-export the bundle") from None

    @property
    def has_localizer(self) -> bool:
        return "localization" in self.metadata

    @property
    def localized_labels(self) -> List[LabelInfo]:
        """The segments of a localised run (``localization.labels``), or ``[]`` without a localiser."""
        spec = self.localization
        if spec is None:
            return []
        return [LabelInfo(int(item["value"]), str(item["name"]), tuple(float(c) for c in item["color"]),
                          item.get("terminology", ""), item["side"]) for item in spec.labels]

    @property
    def architecture(self) -> Dict[str, Any]:
        """Keyword arguments of ``network.build_network``."""
        return dict(self.metadata["architecture"])

    @property
    def preprocessing(self) -> PreprocessingSpec:
        return PreprocessingSpec.from_dict(self.metadata["preprocessing"])

    @property
    def patch_size(self) -> Tuple[int, int, int]:
        """Sliding-window patch in voxels, ITK ``(x, y, z)`` order."""
        x, y, z = self.metadata["inference"]["patch_size"]
        return int(x), int(y), int(z)

    @property
    def overlap(self) -> float:
        """Default sliding-window overlap (fraction of the patch)."""
        return float(self.metadata["inference"].get("overlap", 0.5))

    @property
    def mirror_axes(self) -> Optional[Tuple[str, ...]]:
        """Axes (``"x"``, ``"y"``, ``"z"`` of the canonical orientation) the model was trained to be mirrored
        along, which are the only ones test-time augmentation may flip; ``None`` when the bundle does not say."""
        axes = self.metadata["inference"].get("mirror_axes")
        return None if axes is None else tuple(axes)

    @property
    def weight_entries(self) -> List[Dict[str, str]]:
        """``{"file", "sha256"}`` of every weights file: one, or one per fold (``weights.folds``)."""
        weights = self.metadata["weights"]
        return list(weights["folds"]) if "folds" in weights else [weights]

    @property
    def fold_count(self) -> int:
        """Networks the bundle holds: 1, or the folds of an ensemble."""
        return len(self.weight_entries)

    @property
    def sha256(self) -> str:
        """The weights' sha256; for a fold ensemble its ``metadata_sha256``, which covers every fold's weights."""
        if self.fold_count > 1:
            return self.metadata[DIGEST_KEY]
        return self.metadata["weights"]["sha256"]

    @property
    def integrity_warning(self) -> str:
        """Why only the weights of this bundle are checked (a format_version 1 bundle without a metadata digest),
        or ``""``."""
        if DIGEST_KEY in self.metadata:
            return ""
        return (f"model bundle {self.path} predates {DIGEST_KEY} (format_version 1): its weights are checked but "
                f"its {METADATA_FILE} is not; re-export it with save_bundle")

    @property
    def size_bytes(self) -> int:
        """Size of the weights files together (0 when one is missing)."""
        try:
            return sum(_weights_size(self, entry) for entry in self.weight_entries)
        except ModelBundleError:
            return 0

    @property
    def state_dicts(self) -> List[Dict[str, "torch.Tensor"]]:
        """Every network's weights (CPU tensors), fold order, read on first use after checking their sha256."""
        if self._state_dicts is None:
            self._state_dicts = [_read_weights(self, entry) for entry in self.weight_entries]
        return self._state_dicts

    @property
    def state_dict(self) -> Dict[str, "torch.Tensor"]:
        """The network's weights (CPU tensors) of a single-network bundle (an ensemble: ``state_dicts``)."""
        return self.state_dicts[self._fold_index(None)]

    def _fold_index(self, fold: Optional[int]) -> int:
        if fold is None and self.fold_count > 1:
            raise _fail(self.path, f"the bundle is an ensemble of {self.fold_count} folds", "use build_models() "
                        "(what the Predictor runs) or name one fold (build_model(fold=K))")
        index = 0 if fold is None else int(fold)
        if not 0 <= index < self.fold_count:
            raise _fail(self.path, f"fold {fold} does not exist (the bundle holds {self.fold_count})",
                        f"choose a fold in 0..{self.fold_count - 1}")
        return index

    def build_model(self, device: Union[str, "torch.device"] = "cpu", fold: Optional[int] = None
                    ) -> "AttentionUNet":
        """An ``AttentionUNet`` with this bundle's architecture and weights (strict load), in eval mode; of an
        ensemble, fold ``fold`` (required there, so no caller runs one fold unknowingly)."""
        from .network import build_network

        model = build_network(self.architecture)
        model.load_state_dict(self.state_dicts[self._fold_index(fold)], strict=True)
        return model.to(device).eval()

    def build_models(self, device: Union[str, "torch.device"] = "cpu") -> List["AttentionUNet"]:
        """Every network of the bundle (one, or one per fold), as ``build_model`` builds them."""
        return [self.build_model(device, fold) for fold in range(self.fold_count)]


def _weights_size(bundle: ModelBundle, entry: Mapping[str, str]) -> int:
    """Size of one weights file; ``ModelBundleError`` when it is missing or not a regular file."""
    weights_path = bundle.path / entry["file"]
    try:
        info = os.stat(weights_path)
    except OSError:
        raise _fail(bundle.path, f"weights file {weights_path.name} is missing",
                    "restore it or re-export the bundle") from None
    if not stat.S_ISREG(info.st_mode):
        raise _fail(bundle.path, f"weights file {weights_path.name} is not a regular file",
                    "restore it or re-export the bundle")
    return info.st_size


def _expected_tensors(bundle: ModelBundle) -> Dict[str, Tuple[int, ...]]:
    """The tensor shapes ``architecture`` produces (built on torch's meta device: nothing is allocated)."""
    import torch

    from .network import build_network

    try:
        with torch.device("meta"):
            model = build_network(bundle.architecture)
    except (TypeError, ValueError) as error:
        raise _fail(bundle.path, f"architecture {bundle.architecture} is invalid ({error})",
                    "copy the architecture the weights were trained with") from None
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _read_weights(bundle: ModelBundle, entry: Mapping[str, str]) -> Dict[str, "torch.Tensor"]:
    """Read one weights file with safetensors after verifying its sha256 (no pickle is ever involved). The file
    is read in chunks, and only when its size fits the architecture (float32 tensors plus a safetensors header)."""
    from safetensors.torch import load as load_safetensors

    weights_path = bundle.path / entry["file"]
    size = _weights_size(bundle, entry)
    shapes = _expected_tensors(bundle)
    largest = 4 * sum(math.prod(shape) for shape in shapes.values()) + 1024 * len(shapes) + (1 << 20)
    if size > largest:
        raise _fail(bundle.path, f"weights file {weights_path.name} is {size / 2**20:.1f} MiB, but the "
                    f"architecture's {len(shapes)} tensors take at most {largest / 2**20:.1f} MiB (it was replaced "
                    "or damaged)", "reinstall the bundle from its original source")
    digest, chunks = hashlib.sha256(), []
    try:
        with open(weights_path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
                chunks.append(chunk)
                if len(chunks) << 20 > largest + (1 << 20):  # the file grew while being read
                    break
    except OSError as error:
        raise _fail(bundle.path, f"weights file {weights_path.name} cannot be read ({error.strerror or error})",
                    "check its permissions, or reinstall the bundle") from None
    data = b"".join(chunks)
    actual = digest.hexdigest()
    if actual != entry["sha256"]:
        raise _fail(bundle.path, f"sha256 of {weights_path.name} is {actual[:12]}..., but model.json expects "
                    f"{entry['sha256'][:12]}... (the weights were modified or corrupted)",
                    "reinstall the bundle from its original source")
    try:
        return load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types for malformed headers
        raise _fail(bundle.path, f"{weights_path.name} is not a valid safetensors file ({error})",
                    "reinstall the bundle from its original source") from None


def _check_architecture(bundle: ModelBundle) -> None:
    """Refuse a bundle whose ``architecture`` does not produce exactly the tensors stored in every weights file."""
    expected = _expected_tensors(bundle)
    for entry, state_dict in zip(bundle.weight_entries, bundle.state_dicts):
        _check_tensors(bundle, expected, state_dict, "" if bundle.fold_count == 1 else f" in {entry['file']}")


def _check_tensors(bundle: ModelBundle, expected: Dict[str, Tuple[int, ...]], state_dict: Mapping[str, Any],
                   where: str) -> None:
    stored = {key: tuple(value.shape) for key, value in state_dict.items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = sorted(key for key in set(expected) & set(stored) if expected[key] != stored[key])
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing from the weights (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors in the weights (e.g. {unexpected[0]})")
        if mismatched:
            key = mismatched[0]
            problems.append(f"{len(mismatched)} shape mismatches (e.g. {key}: weights {stored[key]}, "
                            f"architecture {expected[key]})")
        raise _fail(bundle.path, f"the architecture in model.json does not fit the weights{where}: "
                    + "; ".join(problems),
                    "set architecture (channels, out_channels, norm, inter_channels_ratio, deep_supervision) to the "
                    "values the weights were trained with, or re-export the bundle with save_bundle")


def load_bundle(path: PathLike) -> ModelBundle:
    """Load and fully verify a bundle: schema, format version, weights sha256, architecture vs weights.

    Args:
        path: the bundle directory (or its ``model.json``).

    Raises ``ModelBundleError`` with what is wrong and how to fix it.
    """
    directory = _bundle_directory(path)
    bundle = ModelBundle(read_metadata(directory), directory)
    bundle.state_dicts  # noqa: B018 - reads and verifies the weights now, not at first inference
    _check_architecture(bundle)
    spec = bundle.localization
    if spec is not None and not spec.template.is_file():
        raise _fail(directory, f"the localisation template {spec.template.name} is missing",
                    "reinstall the model (its folder must hold the template model.json names)")
    return bundle


def create_metadata(
    name: str,
    labels: Sequence[Union[LabelInfo, Mapping[str, Any]]],
    patch_size: Sequence[int],
    preprocessing: Mapping[str, Any],
    version: str = "1.0.0",
    overlap: float = 0.5,
    description: str = "",
    license: str = "",
    citation: str = "",
    training_data: str = "",
    metrics: Optional[Mapping[str, Any]] = None,
    mirror_axes: Optional[Sequence[str]] = None,
    domain: Optional[Mapping[str, Any]] = None,
    localization: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Metadata for ``save_bundle`` (which adds ``architecture``, ``engine_version`` and ``weights``).

    Args:
        labels: foreground segments in output-channel order (``LabelInfo`` or ``{value, name, color}`` dicts).
        patch_size: sliding-window patch in voxels, ITK ``(x, y, z)`` order.
        preprocessing: ``{"orientation", "target_spacing" (x, y, z mm), "normalization": {...}}``.
        mirror_axes: the axes training mirrored along (the plan's ``flip_axes``); ``None`` leaves them unrecorded,
            and such a bundle refuses test-time augmentation.
        domain: the training data's domain (``domain.measure_domain``), for the domain guard.
        localization: a localiser (``localization.LocalizerSpec`` format; its template goes in with
            ``save_bundle(extra_files=...)``).
    """
    metadata: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": SINGLE_WEIGHTS_FORMAT_VERSION,
        "name": name,
        "version": version,
        "description": description,
        "license": license,
        "citation": citation,
        "training_data": training_data,
        "labels": [label.to_dict() if isinstance(label, LabelInfo) else dict(label) for label in labels],
        "preprocessing": json.loads(json.dumps(dict(preprocessing))),
        "inference": {"patch_size": [int(p) for p in patch_size], "overlap": float(overlap)},
    }
    if mirror_axes is not None:
        metadata["inference"]["mirror_axes"] = [str(axis) for axis in mirror_axes]
    if metrics is not None:
        metadata["metrics"] = json.loads(json.dumps(dict(metrics)))
    for key, section in (("domain", domain), ("localization", localization)):
        if section is not None:
            metadata[key] = json.loads(json.dumps(dict(section)))
    return metadata


def complete_metadata(metadata: Mapping[str, Any], architecture: Mapping[str, Any],
                      directory: PathLike) -> Dict[str, Any]:
    """``metadata`` as ``save_bundle`` writes it for a network of ``architecture`` (``AttentionUNet.config()``),
    checked against the schema; the weights' sha256 is a placeholder until the weights are written. A training run
    calls this before it starts, so a name or label the bundle would refuse is reported before hours of training.

    Raises ``ModelBundleError`` naming the offending key and how to fix it.
    """
    full = dict(metadata)
    full.update(format=FORMAT, format_version=SINGLE_WEIGHTS_FORMAT_VERSION, engine_version=__version__,
                architecture=dict(architecture))
    full["weights"] = {"file": WEIGHTS_FILE, "sha256": "0" * 64}
    return validate_metadata(full, Path(directory).expanduser())


def check_replaceable(directory: PathLike) -> None:
    """Refuse to replace ``directory`` unless it is an empty folder or a model bundle: a real folder (not a link)
    whose ``model.json`` says ``"format": "attention-unet-bundle"`` and which holds nothing but that file and its
    weights (and the localisation template and notice it names). ``--force`` may replace what this tool wrote,
    never a dataset, a work folder or other files."""
    directory = Path(directory).expanduser()
    advice = "choose another output folder (nothing was changed)"
    if directory.is_symlink() or not directory.is_dir():
        raise ModelBundleError(f"{directory} is not a model bundle folder (it is a file or a link); force replaces "
                               f"only a model bundle; {advice}")
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        raise ModelBundleError(f"{directory} cannot be listed ({error.strerror or error}); {advice}") from None
    if not entries:
        return
    try:
        metadata = read_json(directory / METADATA_FILE, "model metadata", ModelBundleError,
                             max_bytes=MAX_METADATA_BYTES)
    except ModelBundleError:
        metadata = None
    weights = metadata.get("weights") if isinstance(metadata, dict) else None
    allowed = {METADATA_FILE, WEIGHTS_FILE, weights.get("file") if isinstance(weights, dict) else WEIGHTS_FILE}
    folds = weights.get("folds") if isinstance(weights, dict) else None
    if isinstance(folds, list):
        allowed |= {entry.get("file") for entry in folds if isinstance(entry, dict)}
    # A localiser's template and its notice belong to the bundle too (the files model.json names).
    localization = metadata.get("localization") if isinstance(metadata, dict) else None
    if isinstance(localization, dict):
        allowed |= {name for name in (localization.get("template"), localization.get("template_notice"))
                    if isinstance(name, str) and Path(name).name == name}
    others = [p.name for p in entries if p.name not in allowed or p.is_symlink() or not p.is_file()]
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or others:
        held = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ModelBundleError(f"{directory} is not a model bundle (it holds {held}); force replaces only a model "
                               f"bundle (a folder of {METADATA_FILE} with format {FORMAT!r} and its weights, "
                               f"nothing else); {advice}")


def save_bundle(model: "AttentionUNet", metadata: Mapping[str, Any], directory: PathLike,
                force: bool = False, extra_files: Optional[Mapping[str, PathLike]] = None) -> ModelBundle:
    """Write ``model`` and ``metadata`` as a bundle directory, atomically; returns the verified bundle.

    ``extra_files`` (name in the bundle -> source file) are copied in too, e.g. a localisation template and its
    licence.

    ``architecture`` comes from ``model.config()``, so it always fits the weights. Everything is written into a
    temporary directory next to ``directory`` and renamed into place at the end, so a failure leaves nothing
    behind. An existing ``directory`` is replaced only with ``force=True``, and only when it is a model bundle or an
    empty folder (``check_replaceable``).
    """
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    _check_target(directory, force)
    full = complete_metadata(metadata, model.config(), directory)

    def write(staging: Path) -> Dict[str, Any]:
        tensors = {key: (value.detach().float() if value.is_floating_point() else value.detach()).cpu().contiguous()
                   for key, value in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT, "name": full["name"]})
        full["weights"]["sha256"] = file_sha256(staging / WEIGHTS_FILE)
        return full

    return _publish(directory, write, extra_files)


def fold_file(fold: int) -> str:
    """The weights file of fold ``fold`` in an ensemble bundle."""
    return f"fold{fold}.safetensors"


def save_ensemble(folds: Sequence[ModelBundle], metadata: Mapping[str, Any], directory: PathLike,
                  force: bool = False, extra_files: Optional[Mapping[str, PathLike]] = None) -> ModelBundle:
    """Write a fold ensemble: ``metadata`` (``create_metadata`` keys) plus every bundle of ``folds`` (same
    architecture, loaded and verified) as ``fold<k>.safetensors``, their bytes copied unchanged, listed with their
    sha256 in ``weights.folds`` (format_version 3). Atomic and ``force`` as ``save_bundle``."""
    directory = Path(directory).expanduser()
    _check_target(directory, force)
    if not 2 <= len(folds) <= MAX_FOLDS:
        raise _fail(directory, f"an ensemble holds 2..{MAX_FOLDS} folds, not {len(folds)}", "give the fold bundles")
    full = complete_metadata(metadata, folds[0].architecture, directory)
    full["format_version"] = FOLDS_FORMAT_VERSION

    def write(staging: Path) -> Dict[str, Any]:
        entries = []
        for index, fold in enumerate(folds):
            (source,) = fold.weight_entries
            target = staging / fold_file(index)
            shutil.copyfile(fold.path / source["file"], target)
            digest = file_sha256(target)
            if digest != source["sha256"]:  # changed since the fold was verified
                raise _fail(fold.path, f"{source['file']} changed while it was copied", "run the command again")
            entries.append({"file": target.name, "sha256": digest})
        full["weights"] = {"folds": entries}
        return full

    return _publish(directory, write, extra_files)


def _check_target(directory: Path, force: bool) -> None:
    if directory.exists() or directory.is_symlink():
        if not force:
            raise _fail(directory, "the directory already exists", "choose another directory or pass force=True")
        check_replaceable(directory)


def _publish(directory: Path, write: Callable[[Path], Dict[str, Any]],
             extra_files: Optional[Mapping[str, PathLike]]) -> ModelBundle:
    """Stage a bundle next to ``directory`` (``write(staging)`` writes the weights and returns the metadata, the
    extra files are copied, the digest and ``model.json`` added), rename it into place, and load it verified.

    The staging folder is ``atomic.temporary_path(directory)``, the one temporary place of every writer, so a
    killed save is cleaned up like a killed segmentation (``remove_stale_temporaries``). ``atomic.replace_folder``
    renames it into place: a replaced bundle waits in the atomic module's temporary folder too, and one that a
    killed save left without its replacement is moved back by the next clean-up."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory.parent)
    staging = temporary_path(directory)
    staging.mkdir(parents=True)
    try:
        full = write(staging)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / Path(name).name)
        full[DIGEST_KEY] = metadata_digest(full)
        (staging / METADATA_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        _apply_umask_permissions(staging)
        replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):  # other outputs of this process are being written there, or it is gone
            staging.parent.rmdir()
    return load_bundle(directory)


def _apply_umask_permissions(directory: Path) -> None:
    """Give a staged bundle the umask's permissions, as any new folder and file: safetensors writes its files
    0600, which would hide an installed model from other users (e.g. Slicer run by someone else)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


class ModelRegistry:
    """Installed models, found on a search path: ``$ATTENTION_UNET_MODELS`` (``os.pathsep``-separated folders of
    bundle directories) first, then the models bundled with the extension. The first bundle of a name wins, so a
    user folder can override a bundled model.
    """

    def __init__(self, search_path: Optional[Iterable[PathLike]] = None) -> None:
        if search_path is None:
            from_env = [p for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p.strip()]
            search_path = [*from_env, BUNDLED_MODELS_DIR]
        self.search_path: List[Path] = [Path(p).expanduser() for p in search_path]

    def scan(self) -> Tuple[List[ModelBundle], List[Tuple[Path, str]]]:
        """``(bundles, problems)``: valid bundles (metadata checked, weights file present but not yet read) and,
        for every folder on the search path that cannot be listed and every directory that has a ``model.json``
        but is not a valid bundle, its path and the reason. One broken bundle never hides the others."""
        bundles: Dict[str, ModelBundle] = {}
        problems: List[Tuple[Path, str]] = []
        for folder in self.search_path:
            try:
                candidates = sorted(folder.iterdir()) if folder.is_dir() else []
            except OSError as error:
                problems.append((folder, f"model folder {folder} cannot be listed ({error.strerror or error})"))
                continue
            for candidate in candidates:
                try:
                    if (candidate.name.startswith(".") or not candidate.is_dir()
                            or not ((candidate / METADATA_FILE).exists() or (candidate / METADATA_FILE).is_symlink())):
                        continue
                    bundle = ModelBundle(read_metadata(candidate), candidate)
                    for entry in bundle.weight_entries:
                        _weights_size(bundle, entry)
                except ModelBundleError as error:
                    problems.append((candidate, str(error)))
                    continue
                except OSError as error:
                    problems.append((candidate, f"model bundle {candidate} cannot be read "
                                                f"({error.strerror or error})"))
                    continue
                bundles.setdefault(bundle.name, bundle)
        return sorted(bundles.values(), key=lambda b: b.name), problems

    def list(self) -> List[ModelBundle]:
        """Valid installed bundles sorted by name (weights are verified only when a bundle is used)."""
        return self.scan()[0]

    def find(self, name_or_path: Optional[PathLike] = None) -> ModelBundle:
        """The bundle at a path, or the installed model of that name (default ``hippocampus``), with its metadata
        validated; its weights are verified when first used (``resolve`` verifies them now)."""
        target = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
        looks_like_path = os.sep in target or (os.altsep or os.sep) in target or target.endswith(".json")
        installed, problems = ([], []) if looks_like_path else self.scan()
        for bundle in installed:
            if bundle.name == target:
                return bundle
        if looks_like_path or Path(target).expanduser().exists():
            directory = _bundle_directory(target)
            return ModelBundle(read_metadata(directory), directory)
        for path, reason in problems:
            if path.name == target:
                raise ModelBundleError(f"the installed model {target!r} is broken: {reason}")
        available = ", ".join(f"{b.name} ({b.version})" for b in installed) or "none"
        searched = os.pathsep.join(str(p) for p in self.search_path)
        raise ModelBundleError(
            f"no installed model named {target!r} (available: {available}; searched {searched}); choose an "
            f"installed model, give the path of a bundle directory, or add its parent folder to {MODELS_ENV}")

    def resolve(self, name_or_path: Optional[PathLike] = None) -> ModelBundle:
        """``find`` the bundle, then load it fully verified (weights sha256, architecture vs weights)."""
        return load_bundle(self.find(name_or_path).path)
