"""Model bundles (a directory with ``model.json`` + ``model.safetensors``) and the registry of installed models.

A bundle is self-describing: architecture, labels (values, names, colours), preprocessing, patch size, provenance
and the sha256 of its weights (format in ``DESIGN.md``). Loading never executes code from a model file: weights are
read with safetensors only, after their sha256 has been checked, and pickle-based checkpoints are refused.

This module imports neither torch nor safetensors at module scope, so the Slicer panel (and ``attention-unet
models``) can list installed models without paying for, or needing, torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import __version__
from .errors import ModelBundleError
from .preprocessing import PreprocessingSpec

if TYPE_CHECKING:  # imported for annotations only; torch stays out of module scope
    import torch

    from .localization import LocalizerSpec

    from .network import AttentionUNet

FORMAT = "attention-unet-bundle"
FORMAT_VERSION = 1
METADATA_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_MODEL = "hippocampus"
MODELS_ENV = "ATTENTION_UNET_MODELS"
#: The extension's ``AttentionUNetSegment/Resources`` (source tree, Slicer install), or the copy of its models and
#: sample that a wheel installs as ``AttentionUNetSegmentLib/resources``.
_PACKAGED_RESOURCES = Path(__file__).resolve().parent / "resources"
RESOURCES_DIR = (_PACKAGED_RESOURCES if _PACKAGED_RESOURCES.is_dir()
                 else Path(__file__).resolve().parents[1] / "Resources")
#: Models shipped with the extension: ``<RESOURCES_DIR>/Models/<name>/``.
BUNDLED_MODELS_DIR = RESOURCES_DIR / "Models"

#: File types that hold pickled Python objects; loading one could run arbitrary code.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
_REQUIRED_KEYS = ("format", "format_version", "name", "version", "architecture", "labels", "preprocessing",
                  "inference", "weights")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Largest label value: label maps are 16-bit signed (int16), which is also what 3D Slicer exports them as.
MAX_LABEL_VALUE = 32767

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
        raise _fail(directory, "'labels' must be a non-empty list", "list one {value, name, color} per foreground class")
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
                    f"set it to {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise _fail(directory, f"format_version {version} is newer than this engine supports ({FORMAT_VERSION})",
                    f"upgrade the AttentionUNet engine (this is {__version__})")
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise _fail(directory, f"{METADATA_FILE} lacks required keys {missing}", "re-export the bundle with save_bundle")
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
    for key in ("in_channels", "out_channels"):
        value = architecture.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(directory, f"architecture.{key} must be a positive integer, got {value!r}",
                        "copy the architecture the weights were trained with")
    if architecture["out_channels"] < 2:
        raise _fail(directory, "architecture.out_channels must be at least 2 (background + one class)",
                    "copy the architecture the weights were trained with")
    _validate_labels(directory, metadata["labels"], architecture["out_channels"])
    try:
        PreprocessingSpec.from_dict(metadata["preprocessing"])
    except ModelBundleError as error:
        raise _fail(directory, str(error), "use the preprocessing the model was trained with") from None
    patch = metadata["inference"].get("patch_size")
    if (not isinstance(patch, list) or len(patch) != 3
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in patch)):
        raise _fail(directory, f"inference.patch_size must be three positive integers (x, y, z), got {patch!r}",
                    "set the patch size the model was trained with")
    overlap = metadata["inference"].get("overlap", 0.5)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise _fail(directory, f"inference.overlap must be a number in [0, 1), got {overlap!r}", "use e.g. 0.5")
    weights = metadata["weights"]
    file_name, digest = weights.get("file"), weights.get("sha256")
    if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in ("", ".", ".."):
        raise _fail(directory, f"weights.file must be a plain file name inside the bundle, got {file_name!r}",
                    f"use {WEIGHTS_FILE!r}")
    if not file_name.endswith(".safetensors"):
        raise _fail(directory, f"weights.file {file_name!r} is not a .safetensors file; pickle-based weights are "
                    "never loaded because they can execute code",
                    "convert the state_dict with safetensors.torch.save_file and re-export with save_bundle")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise _fail(directory, "weights.sha256 must be 64 lower-case hex digits",
                    "re-export the bundle with save_bundle")
    return metadata


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


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """Read and validate a bundle's ``model.json`` without touching its weights (and without torch)."""
    directory = _bundle_directory(path)
    metadata_path = directory / METADATA_FILE
    if not metadata_path.is_file():
        raise _fail(directory, f"{METADATA_FILE} is missing", f"a bundle directory holds {METADATA_FILE} and "
                    f"{WEIGHTS_FILE}; re-export it with save_bundle")
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(directory, f"{METADATA_FILE} is not readable JSON ({error})",
                    "restore the file or re-export the bundle") from None
    return validate_metadata(metadata, directory)


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
    weights are verified the first time ``state_dict`` is used).
    """

    def __init__(self, metadata: Dict[str, Any], path: PathLike,
                 state_dict: Optional[Dict[str, "torch.Tensor"]] = None) -> None:
        self.path = Path(path)
        self.metadata = validate_metadata(metadata, self.path)
        self._state_dict = state_dict

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
        from .localization import LocalizerSpec

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
    def sha256(self) -> str:
        return self.metadata["weights"]["sha256"]

    @property
    def weights_path(self) -> Path:
        return self.path / self.metadata["weights"]["file"]

    @property
    def size_bytes(self) -> int:
        """Size of the weights file (0 when it is missing)."""
        return self.weights_path.stat().st_size if self.weights_path.is_file() else 0

    @property
    def state_dict(self) -> Dict[str, "torch.Tensor"]:
        """The network's weights (CPU tensors), read on first use after checking their sha256."""
        if self._state_dict is None:
            self._state_dict = _read_weights(self)
        return self._state_dict

    def build_model(self, device: Union[str, "torch.device"] = "cpu") -> "AttentionUNet":
        """An ``AttentionUNet`` with this bundle's architecture and weights (strict load), in eval mode."""
        from .network import build_network

        model = build_network(self.architecture)
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device).eval()


def _read_weights(bundle: ModelBundle) -> Dict[str, "torch.Tensor"]:
    """Read the weights with safetensors after verifying their sha256 (no pickle is ever involved)."""
    from safetensors.torch import load as load_safetensors

    weights_path = bundle.weights_path
    if not weights_path.is_file():
        raise _fail(bundle.path, f"weights file {weights_path.name} is missing", "restore it or re-export the bundle")
    data = weights_path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != bundle.sha256:
        raise _fail(bundle.path, f"sha256 of {weights_path.name} is {actual[:12]}..., but model.json expects "
                    f"{bundle.sha256[:12]}... (the weights were modified or corrupted)",
                    "reinstall the bundle from its original source")
    try:
        return load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types for malformed headers
        raise _fail(bundle.path, f"{weights_path.name} is not a valid safetensors file ({error})",
                    "reinstall the bundle from its original source") from None


def _check_architecture(bundle: ModelBundle) -> None:
    """Refuse a bundle whose ``architecture`` does not produce exactly the tensors stored in its weights."""
    import torch

    from .network import build_network

    try:
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            expected = {key: tuple(value.shape) for key, value in build_network(bundle.architecture).state_dict().items()}
    except (TypeError, ValueError) as error:
        raise _fail(bundle.path, f"architecture {bundle.architecture} is invalid ({error})",
                    "copy the architecture the weights were trained with") from None
    stored = {key: tuple(value.shape) for key, value in bundle.state_dict.items()}
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
        raise _fail(bundle.path, "the architecture in model.json does not fit the weights: " + "; ".join(problems),
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
    bundle.state_dict  # noqa: B018 - reads and verifies the weights now, not at first inference
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
    domain: Optional[Mapping[str, Any]] = None,
    localization: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Metadata for ``save_bundle`` (which adds ``architecture``, ``engine_version`` and ``weights``).

    Args:
        labels: foreground segments in output-channel order (``LabelInfo`` or ``{value, name, color}`` dicts).
        patch_size: sliding-window patch in voxels, ITK ``(x, y, z)`` order.
        preprocessing: ``{"orientation", "target_spacing" (x, y, z mm), "normalization": {...}}``.
        domain: the training data's domain (``domain.measure_domain``), for the domain guard.
        localization: a localiser (``localization.LocalizerSpec`` format; its template goes in with
            ``save_bundle(extra_files=...)``).
    """
    metadata: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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
    full.update(format=FORMAT, format_version=FORMAT_VERSION, engine_version=__version__,
                architecture=dict(architecture))
    full["weights"] = {"file": WEIGHTS_FILE, "sha256": "0" * 64}
    return validate_metadata(full, Path(directory).expanduser())


def save_bundle(model: "AttentionUNet", metadata: Mapping[str, Any], directory: PathLike,
                force: bool = False, extra_files: Optional[Mapping[str, PathLike]] = None) -> ModelBundle:
    """Write ``model`` and ``metadata`` as a bundle directory, atomically; returns the verified bundle.

    ``extra_files`` (name in the bundle -> source file) are copied in too, e.g. a localisation template and its
    licence.

    ``architecture`` comes from ``model.config()``, so it always fits the weights. Everything is written into a
    temporary directory next to ``directory`` and renamed into place at the end, so a failure leaves nothing
    behind. An existing ``directory`` is replaced only with ``force=True``.
    """
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    if directory.exists() and not force:
        raise _fail(directory, "the directory already exists", "choose another directory or pass force=True")
    full = complete_metadata(metadata, model.config(), directory)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-{os.getpid()}-", dir=directory.parent))
    try:
        tensors = {key: (value.detach().float() if value.is_floating_point() else value.detach()).cpu().contiguous()
                   for key, value in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT, "name": full["name"]})
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / Path(name).name)
        full["weights"]["sha256"] = file_sha256(staging / WEIGHTS_FILE)
        (staging / METADATA_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        _apply_umask_permissions(staging)
        if directory.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, retired / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(directory)


def _apply_umask_permissions(directory: Path) -> None:
    """Give a staged bundle ordinary permissions: ``mkdtemp`` makes its directory 0700 and safetensors writes
    0600 files, which would hide an installed model from other users (e.g. Slicer run by someone else)."""
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
        """``(bundles, problems)``: valid bundles (metadata checked, weights not yet read) and, for every
        directory that has a ``model.json`` but is not a valid bundle, its path and the reason."""
        bundles: Dict[str, ModelBundle] = {}
        problems: List[Tuple[Path, str]] = []
        for folder in self.search_path:
            if not folder.is_dir():
                continue
            for candidate in sorted(folder.iterdir()):
                if candidate.name.startswith(".") or not (candidate / METADATA_FILE).is_file():
                    continue
                try:
                    bundle = ModelBundle(read_metadata(candidate), candidate)
                except ModelBundleError as error:
                    problems.append((candidate, str(error)))
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
        installed = [] if looks_like_path else self.list()
        for bundle in installed:
            if bundle.name == target:
                return bundle
        if looks_like_path or Path(target).expanduser().exists():
            directory = _bundle_directory(target)
            return ModelBundle(read_metadata(directory), directory)
        available = ", ".join(f"{b.name} ({b.version})" for b in installed) or "none"
        searched = os.pathsep.join(str(p) for p in self.search_path)
        raise ModelBundleError(
            f"no installed model named {target!r} (available: {available}; searched {searched}); choose an "
            f"installed model, give the path of a bundle directory, or add its parent folder to {MODELS_ENV}")

    def resolve(self, name_or_path: Optional[PathLike] = None) -> ModelBundle:
        """``find`` the bundle, then load it fully verified (weights sha256, architecture vs weights)."""
        return load_bundle(self.find(name_or_path).path)
