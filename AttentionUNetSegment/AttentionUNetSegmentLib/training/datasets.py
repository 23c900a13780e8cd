"""Training datasets: discovery (MSD layout or a list of pairs), validation, and the preprocessed-case cache.

Two layouts are accepted:

- a Medical Segmentation Decathlon / nnU-Net folder: ``imagesTr/``, ``labelsTr/`` and ``dataset.json`` whose
  ``labels`` map values to names and whose ``training`` list names image/label pairs (paths relative to the folder);
- a pairs file: ``.json`` with the same ``labels``/``training`` keys (paths relative to the file), or ``.csv`` with
  an ``image,label`` header (label names then come from the caller).

Coarse labels (region-based training): a listing may say that a label value stands for several of the model's
classes, ``"label_groups": {"1": ["Anterior", "Posterior"]}`` (this dataset's value -> model label names), for the
whole dataset or, in a ``training`` entry, for that case only (replacing the dataset's). ``load_datasets`` merges
several listings into one training set: the first one's labels (less its group values) are the model's classes,
and every other label or group member must name one of them; each case then carries ``classes`` (its label map's
values -> the model label values each stands for), from which training builds the case's label space.

``inspect_dataset`` reads every case once and refuses, before any training time is spent, unreadable files,
image/label geometry mismatches, label values that ``labels`` does not list and labels without foreground, each
with a ``DatasetError`` naming the case. ``CaseCache`` stores each case preprocessed (reoriented, resampled,
normalised) as ``<name>.npz`` + ``<name>.json`` under a folder keyed by the preprocessing spec, so epochs never
re-read or re-resample the originals.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import DatasetError, InputImageError
from ..fileio.atomic import atomic_output
from ..fileio.imageio import READ_EXTENSIONS, image_stem, read_image, read_label
from ..fileio.jsonfile import read_json, read_text
from ..model.bundle import MAX_LABEL_VALUE
from ..preprocessing.preprocess import PreprocessingSpec, preprocess, reorient, resample_to_reference
from .planning import CaseFingerprint, DatasetFingerprint

PathLike = Union[str, "os.PathLike[str]"]
#: Geometry tolerance between an image and its label (mm for origin, relative for spacing, absolute for cosines).
GEOMETRY_TOLERANCE = 1e-3
#: Foreground voxels kept per label per case for foreground-oversampled patch centres.
MAX_FOREGROUND_SAMPLES = 10000
_FINGERPRINT_INTENSITIES = 200


#: A case's label classes: ``(value in its label map, model label values it stands for)``, sorted by value.
Classes = Tuple[Tuple[int, Tuple[int, ...]], ...]


@dataclass(frozen=True)
class CaseRecord:
    """One training case: a name (the image's file stem), its image and label paths, and ``classes`` when its
    label values are not the model's own (coarse labels or another dataset's numbering; empty: they are)."""

    name: str
    image: Path
    label: Path
    classes: Classes = ()

    @property
    def coarse(self) -> bool:
        """True when some value of this case's label map stands for several model classes."""
        return any(len(members) > 1 for _, members in self.classes)


@dataclass
class Dataset:
    """Cases plus the foreground label names (``{value: name}``, background excluded) and the modality."""

    cases: List[CaseRecord]
    labels: Dict[int, str]
    modality: str = "MRI"
    source: str = ""
    #: ``label_groups`` of the listing: value -> model label names (``load_datasets`` resolves them).
    groups: Dict[int, Tuple[str, ...]] = field(default_factory=dict)
    #: per-case ``label_groups`` (case name -> value -> model label names), replacing ``groups`` for that case.
    case_groups: Dict[str, Dict[int, Tuple[str, ...]]] = field(default_factory=dict)
    #: cases of the listings after the first (``load_datasets``): they add training data and are never validated on.
    training_only: List[str] = field(default_factory=list)

    @property
    def label_values(self) -> List[int]:
        return sorted(self.labels)


@dataclass
class PreprocessedCase:
    """A case on the network's grid, held in memory for patch sampling.

    ``image``: float32 ``(z, y, x)``, normalised. ``label``: uint8/int16 ``(z, y, x)``.
    ``foreground``: per label value, up to ``MAX_FOREGROUND_SAMPLES`` voxel indices ``(N, 3)`` (z, y, x) where
    the label is that value (centres for foreground-oversampled patches).
    ``space``: for a coarsely labelled case in training, the network channels each of its label indices merges
    (``losses.LabelSpace``); ``None``: its labels are the network's channels.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    foreground: Dict[int, np.ndarray]
    space: Optional[Tuple[Tuple[int, ...], ...]] = None


def _parse_labels(raw: Any, source: str) -> Dict[int, str]:
    """``{value: name}`` from an MSD ``{"1": "name"}`` or an nnU-Net v2 ``{"name": 1}`` mapping (background
    dropped)."""
    if not isinstance(raw, Mapping) or not raw:
        raise DatasetError(f"{source}: 'labels' must map label values to names, e.g. "
                           '{"0": "background", "1": "Anterior"}')
    if all(isinstance(value, int) and not isinstance(value, bool) for value in raw.values()):
        raw = {str(value): name for name, value in raw.items()}  # nnU-Net v2 writes name -> value
    labels: Dict[int, str] = {}
    for key, name in raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise DatasetError(f"{source}: label key {key!r} is not an integer value; write labels as "
                               '{"1": "name", ...}') from None
        if value < 0 or value > MAX_LABEL_VALUE:
            raise DatasetError(f"{source}: label value {value} is outside 0..{MAX_LABEL_VALUE} (label maps are "
                               "int16); renumber the labels")
        if value != 0:
            labels[value] = str(name)
    if not labels:
        raise DatasetError(f"{source}: 'labels' lists no foreground label (only background)")
    return labels


def _parse_groups(raw: Any, labels: Mapping[int, str], source: str, where: str) -> Dict[int, Tuple[str, ...]]:
    """``{value: (model label names)}`` from a ``label_groups`` entry (``{"1": ["Anterior", "Posterior"]}``); the
    values must be labels of the listing and no model label may belong to two groups."""
    if raw is None:
        return {}
    example = '{"1": ["Anterior", "Posterior"]}'
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{source}: {where}'label_groups' must map a label value to the model label names it "
                           f"stands for, e.g. {example}")
    groups: Dict[int, Tuple[str, ...]] = {}
    owner: Dict[str, int] = {}
    for key, members in raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise DatasetError(f"{source}: {where}label_groups key {key!r} is not a label value; write e.g. "
                               f"{example}") from None
        if value not in labels:
            raise DatasetError(f"{source}: {where}label_groups names value {value}, which 'labels' does not list "
                               f"(known: {sorted(labels)})")
        if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
            raise DatasetError(f"{source}: {where}label_groups[{key!r}] must be a non-empty list of model label "
                               f"names, e.g. {example}")
        for member in members:
            if member in owner:
                raise DatasetError(f"{source}: {where}label_groups overlap: model label {member!r} is in the "
                                   f"groups of values {owner[member]} and {value}; a model class may belong to "
                                   "one group only")
            owner[member] = value
        groups[value] = tuple(members)
    return groups


def _discover_pairs(root: Path, source: str) -> List[Tuple[Path, Path]]:
    """nnU-Net v2 layout without a ``training`` list: ``labelsTr/<case><ext>`` pairs with
    ``imagesTr/<case>_0000<ext>`` (or ``imagesTr/<case><ext>``); only single-channel images are supported."""
    pairs = []
    for label in sorted((root / "labelsTr").glob("*")):
        if not label.name.lower().endswith(READ_EXTENSIONS) or label.name.startswith("."):
            continue
        stem, extension = image_stem(label), label.name[len(image_stem(label)):]
        if (root / "imagesTr" / f"{stem}_0001{extension}").exists():
            raise DatasetError(f"case {stem}: has several image channels (_0000, _0001, ...); this engine trains "
                               "single-channel models")
        candidates = [root / "imagesTr" / f"{stem}_0000{extension}", root / "imagesTr" / f"{stem}{extension}"]
        image = next((c for c in candidates if c.is_file()), None)
        if image is None:
            raise DatasetError(f"case {stem}: no image {candidates[0].name} in {root / 'imagesTr'} for label "
                               f"{label.name}")
        pairs.append((image, label))
    if not pairs:
        raise DatasetError(f"{source}: no 'training' list and no label files in {root / 'labelsTr'}")
    return pairs


def _resolve(base: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else (base / candidate).resolve()


def _records(pairs: Iterable[Tuple[Path, Path]], source: str) -> List[CaseRecord]:
    records: List[CaseRecord] = []
    names = set()
    for image, label in pairs:
        name = image_stem(image)
        if name.endswith("_0000") and image_stem(label) == name[:-5]:
            name = name[:-5]  # nnU-Net channel suffix: the case is named like its label
        if name in names:
            raise DatasetError(f"{source}: two cases share the name {name!r}; give every image a unique file name")
        names.add(name)
        records.append(CaseRecord(name=name, image=image, label=label))
    if not records:
        raise DatasetError(f"{source}: no training cases listed")
    return records


def load_dataset(path: PathLike, label_names: Optional[Mapping[int, str]] = None) -> Dataset:
    """Discover a dataset: an MSD folder (with ``dataset.json``), a ``.json`` pairs file or a ``.csv`` pairs file.
    An nnU-Net v2 ``dataset.json`` (``{"name": value}`` labels, no ``training`` list) pairs ``labelsTr/<case>``
    with ``imagesTr/<case>_0000``.

    ``label_names`` (``{value: name}``) overrides or supplies the label names (required for ``.csv`` files).
    Raises ``DatasetError`` if the layout is not recognised or the listing is malformed.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        listing = path / "dataset.json"
        if not listing.exists():
            raise DatasetError(f"{path} has no dataset.json; use the Medical Segmentation Decathlon layout "
                               "(imagesTr/, labelsTr/, dataset.json) or pass a .json/.csv file of image/label pairs")
        path = listing
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist; pass an MSD folder or a .json/.csv file of pairs")
    base = path.parent
    source = str(path)
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
        if not rows or not {"image", "label"} <= set(rows[0]):
            raise DatasetError(f"{source}: a pairs CSV needs an 'image,label' header and one row per case")
        pairs = [(_resolve(base, row["image"]), _resolve(base, row["label"])) for row in rows]
        if not label_names:
            raise DatasetError(f"{source}: a CSV has no label names; pass them (e.g. --label-names 1=Liver 2=Tumour)")
        return Dataset(_records(pairs, source), dict(label_names), "MRI", source)
    listing = read_json(path, "dataset listing", DatasetError)
    if not isinstance(listing, Mapping):
        raise DatasetError(f"{source}: expected an object with 'labels' and a 'training' list of "
                           "{'image', 'label'} pairs")
    if "training" not in listing and (base / "labelsTr").is_dir():
        pairs = _discover_pairs(base, source)
        entries: List[Any] = []
    elif not isinstance(listing.get("training"), list):
        raise DatasetError(f"{source}: expected a 'training' list of {{'image', 'label'}} pairs")
    else:
        entries = listing["training"]
        pairs = _listed_pairs(entries, base, source)
    labels = dict(label_names) if label_names else _parse_labels(listing.get("labels"), source)
    modality = listing.get("modality", listing.get("channel_names", {}))
    modality = str(modality.get("0", "MRI")) if isinstance(modality, Mapping) else str(modality or "MRI")
    records = _records(pairs, source)
    groups = _parse_groups(listing.get("label_groups"), labels, source, "")
    case_groups = {record.name: _parse_groups(entry["label_groups"], labels, source, f"training[{index}] ")
                   for index, (record, entry) in enumerate(zip(records, entries))
                   if isinstance(entry, Mapping) and "label_groups" in entry}
    return Dataset(records, labels, modality, source, groups, case_groups)


def load_datasets(paths: Sequence[PathLike], label_names: Optional[Mapping[int, str]] = None) -> Dataset:
    """One training set from one or more listings (``load_dataset`` each), coarse labels resolved.

    The model's classes are the first listing's labels (``label_names`` override them) less its group values.
    Every case of a later listing, and every case with label groups, gets ``classes``: its label values mapped,
    by name, to the model label values (a group to all its members). Raises ``DatasetError`` naming the listing
    for a label or group member that is no model class, a group covering all of them in the first listing, or
    a case name used twice.
    """
    datasets = [load_dataset(path, label_names if index == 0 else None) for index, path in enumerate(paths)]
    first = datasets[0]
    model_labels = {value: name for value, name in first.labels.items() if value not in first.groups}
    if not model_labels:
        raise DatasetError(f"{first.source}: every label is a group; the first dataset's 'labels' must name the "
                           "model's own classes (list coarser datasets after it)")
    by_name = {name: value for value, name in model_labels.items()}
    cases: List[CaseRecord] = []
    seen: Dict[str, str] = {}
    for index, dataset in enumerate(datasets):
        for record in dataset.cases:
            if record.name in seen:
                raise DatasetError(f"{dataset.source}: case {record.name!r} is also a case of {seen[record.name]}; "
                                   "case names must be unique across the datasets trained together")
            seen[record.name] = dataset.source
            groups = dataset.case_groups.get(record.name, dataset.groups)
            if index == 0 and not groups:
                cases.append(record)
                continue
            classes = []
            for value, name in sorted(dataset.labels.items()):
                members = groups.get(value, (name,))
                unknown = [m for m in members if m not in by_name]
                if unknown:
                    where = "label_groups of" if value in groups else "label"
                    raise DatasetError(f"{dataset.source}: {where} value {value} names {unknown[0]!r}, which is not "
                                       f"a model class (the model's classes: {', '.join(by_name)}, from "
                                       f"{first.source}); use one of those names")
                classes.append((value, tuple(sorted(by_name[m] for m in members))))
            cases.append(replace(record, classes=tuple(classes)))
    extra = [case.name for dataset in datasets[1:] for case in dataset.cases]
    return Dataset(cases, model_labels, first.modality, first.source, training_only=extra)


def _csv_rows(path: Path) -> List[Dict[str, str]]:
    """The rows of a pairs CSV, read under the limits of a JSON listing (``jsonfile.read_text``)."""
    try:
        return list(csv.DictReader(io.StringIO(read_text(path, "dataset listing", DatasetError), newline="")))
    except csv.Error as error:
        raise DatasetError(f"dataset listing {path} is not a readable CSV ({error})") from None


def _listed_pairs(entries: List[Any], base: Path, source: str) -> List[Tuple[Path, Path]]:
    pairs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("label"), str):
            raise DatasetError(f"{source}: training[{index}] must be {{'image': path, 'label': path}}")
        pairs.append((_resolve(base, entry["image"]), _resolve(base, entry["label"])))
    return pairs


def _read_case(case: CaseRecord) -> Tuple[sitk.Image, sitk.Image]:
    try:
        image = read_image(case.image)
    except InputImageError as error:
        raise DatasetError(f"case {case.name}: image {case.image} is unusable: {error}") from None
    if not case.label.is_file():
        raise DatasetError(f"case {case.name}: label file {case.label} does not exist; check the listing")
    try:
        label = read_label(case.label)
    except InputImageError as error:
        raise DatasetError(f"case {case.name}: label file {case.label} is unusable: {error}") from None
    return image, label


def grid_differences(image: sitk.Image, other: sitk.Image) -> List[str]:
    """How ``other``'s grid (size, spacing, origin, direction) differs from ``image``'s; empty when it matches."""
    problems = []
    if image.GetSize() != other.GetSize():
        problems.append(f"size {other.GetSize()} vs {image.GetSize()}")
    if not np.allclose(image.GetSpacing(), other.GetSpacing(), rtol=GEOMETRY_TOLERANCE, atol=0):
        problems.append(f"spacing {other.GetSpacing()} vs {image.GetSpacing()}")
    tolerance = GEOMETRY_TOLERANCE * max(1.0, max(image.GetSpacing()))
    if not np.allclose(image.GetOrigin(), other.GetOrigin(), atol=tolerance, rtol=0):
        problems.append(f"origin {other.GetOrigin()} vs {image.GetOrigin()}")
    if not np.allclose(image.GetDirection(), other.GetDirection(), atol=GEOMETRY_TOLERANCE, rtol=0):
        problems.append("direction cosines differ")
    return problems


def check_case_geometry(case: CaseRecord, image: sitk.Image, label: sitk.Image) -> None:
    """Refuse a label whose grid (size, spacing, origin, direction) differs from its image's."""
    problems = grid_differences(image, label)
    if problems:
        raise DatasetError(f"case {case.name}: label {case.label.name} does not lie on its image's grid (label "
                           + "; ".join(problems) + " of the image); resample the label onto the image (nearest "
                           "neighbour) or fix the pairing")


def _label_array(case: CaseRecord, label: sitk.Image, allowed: Sequence[int]) -> np.ndarray:
    if label.GetNumberOfComponentsPerPixel() != 1 or label.GetDimension() != 3:
        raise DatasetError(f"case {case.name}: label {case.label.name} must be a 3D scalar label map")
    array = sitk.GetArrayFromImage(label)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise DatasetError(f"case {case.name}: label {case.label.name} holds non-integer values; "
                               "save label maps as integers")
    values = np.unique(array).astype(np.int64)
    unknown = sorted(set(values.tolist()) - set(allowed) - {0})
    if unknown:
        raise DatasetError(f"case {case.name}: label {case.label.name} contains values {unknown} that the "
                           f"dataset's labels do not list (known: {sorted(allowed)}); add them to dataset.json "
                           "'labels' or fix the label map")
    if values.max() == 0:
        raise DatasetError(f"case {case.name}: label {case.label.name} is empty (no foreground voxel); remove the "
                           "case or provide its segmentation")
    return array


def _check_disjoint(case: CaseRecord, present: Iterable[int]) -> None:
    """Refuse a case whose label map holds two values standing for overlapping model classes (say Anterior and
    a group Anterior + Posterior): no voxel could say which one it is."""
    members = dict(case.classes)
    owner: Dict[int, int] = {}
    for value in sorted(present):
        for model_value in members.get(value, (value,)):
            if model_value in owner:
                raise DatasetError(f"case {case.name}: label {case.label.name} holds values {owner[model_value]} "
                                   f"and {value}, which both stand for model label value {model_value} "
                                   "(label_groups overlap); label the case with one of them, or give this case "
                                   "its own label_groups in the listing")
            owner[model_value] = value


def inspect_case(case: CaseRecord, label_values: Sequence[int], orientation: str = "RAS",
                 seed: int = 0) -> CaseFingerprint:
    """Read and validate one case; returns its fingerprint (spacing/size in ``orientation``). Raises
    ``DatasetError`` naming the case."""
    image, label = _read_case(case)
    check_case_geometry(case, image, label)
    array = _label_array(case, label, label_values)
    counts = {int(v): int(c) for v, c in zip(*np.unique(array, return_counts=True)) if v != 0}
    _check_disjoint(case, counts)
    image, label = reorient(image, orientation), reorient(label, orientation)
    inside = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(label) > 0]
    rng = np.random.default_rng(seed)
    sample = rng.choice(inside, size=min(_FINGERPRINT_INTENSITIES, inside.size), replace=False)
    return CaseFingerprint(name=case.name, spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore
                           size=tuple(int(s) for s in image.GetSize()), label_voxels=counts,  # type: ignore
                           foreground_intensities=[float(v) for v in sample])


def inspect_dataset(dataset: Dataset, orientation: str = "RAS", minimum_cases: int = 2,
                    progress: Optional[Any] = None) -> DatasetFingerprint:
    """Validate every case (see module docstring) and gather the fingerprint planning needs.

    Raises ``DatasetError`` for the first bad case, or when fewer than ``minimum_cases`` cases exist.
    """
    if len(dataset.cases) < minimum_cases:
        raise DatasetError(f"{dataset.source}: {len(dataset.cases)} case(s) is too few; training with a validation "
                           f"split needs at least {minimum_cases}")
    fingerprints = []
    for index, case in enumerate(dataset.cases):
        allowed = [value for value, _ in case.classes] if case.classes else dataset.label_values
        fingerprints.append(inspect_case(case, allowed, orientation, seed=index))
        if progress is not None:
            progress("inspect", (index + 1) / len(dataset.cases), case.name)
    return DatasetFingerprint(cases=fingerprints, modality=dataset.modality)


def _file_signature(path: Path) -> Dict[str, Any]:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def spec_key(spec: PreprocessingSpec) -> str:
    """Short hash naming a cache folder: cases preprocessed with different specs never mix."""
    text = json.dumps(spec.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def preprocess_case(case: CaseRecord, spec: PreprocessingSpec, seed: int = 0) -> PreprocessedCase:
    """Read, reorient, resample and normalise a case; the label is resampled (nearest) onto the image's grid."""
    image, label = _read_case(case)
    prepared = preprocess(image, spec)
    label_grid = resample_to_reference(reorient(label, spec.orientation), prepared.grid, is_label=True)
    label_array = sitk.GetArrayFromImage(label_grid)
    label_array = label_array.astype(np.uint8 if label_array.max() <= 255 else np.int16)
    return PreprocessedCase(case.name, prepared.array.astype(np.float32, copy=False), label_array,
                            foreground_samples(label_array, seed))


def foreground_samples(label: np.ndarray, seed: int = 0) -> Dict[int, np.ndarray]:
    """Up to ``MAX_FOREGROUND_SAMPLES`` ``(z, y, x)`` voxel indices per label value present in ``label``."""
    rng = np.random.default_rng(seed)
    samples = {}
    for value in np.unique(label):
        if value == 0:
            continue
        indices = np.argwhere(label == value).astype(np.int32)
        if len(indices) > MAX_FOREGROUND_SAMPLES:
            indices = indices[np.sort(rng.choice(len(indices), MAX_FOREGROUND_SAMPLES, replace=False))]
        samples[int(value)] = indices
    return samples


class CaseCache:
    """Preprocessed cases on disk: ``<root>/<spec hash>/<name>.npz`` (image, label, foreground indices) and
    ``<name>.json`` (source file signatures + spec). An entry whose sources changed is rebuilt."""

    def __init__(self, root: PathLike, spec: PreprocessingSpec) -> None:
        self.spec = spec
        self.directory = Path(root) / spec_key(spec)

    def _paths(self, name: str) -> Tuple[Path, Path]:
        return self.directory / f"{name}.npz", self.directory / f"{name}.json"

    def _signature(self, case: CaseRecord) -> Dict[str, Any]:
        return {"image": _file_signature(case.image), "label": _file_signature(case.label),
                "spec": self.spec.to_dict()}

    def load(self, case: CaseRecord, seed: int = 0) -> PreprocessedCase:
        """The cached case, preprocessing (and caching) it first when missing or stale."""
        arrays_path, info_path = self._paths(case.name)
        signature = self._signature(case)
        if arrays_path.is_file() and info_path.is_file():
            try:
                if read_json(info_path, "cache entry", DatasetError) == signature:
                    with np.load(arrays_path) as data:
                        foreground = {int(key[3:]): data[key] for key in data.files if key.startswith("fg_")}
                        return PreprocessedCase(case.name, data["image"], data["label"], foreground)
            except (OSError, ValueError, KeyError, DatasetError):
                pass  # a damaged entry is simply rebuilt
        prepared = preprocess_case(case, self.spec, seed)
        self._store(prepared, signature)
        return prepared

    def _store(self, case: PreprocessedCase, signature: Dict[str, Any]) -> None:
        arrays_path, info_path = self._paths(case.name)
        # One stack, so a failure leaves no partial of either file. The description is entered first and so renamed
        # last: it is what makes ``load`` trust the arrays, so it never describes arrays that are not in place.
        with contextlib.ExitStack() as stack:
            info_partial = stack.enter_context(atomic_output(info_path, force=True))
            np.savez(stack.enter_context(atomic_output(arrays_path, force=True)), image=case.image,
                     label=case.label, **{f"fg_{value}": indices for value, indices in case.foreground.items()})
            info_partial.write_text(json.dumps(signature, indent=1), encoding="utf-8")

    def load_all(self, cases: Sequence[CaseRecord], progress: Optional[Any] = None) -> List[PreprocessedCase]:
        loaded = []
        for index, case in enumerate(cases):
            loaded.append(self.load(case, seed=index))
            if progress is not None:
                progress("preprocess", (index + 1) / len(cases), case.name)
        return loaded


def _case_count(total: int, size: Union[int, float]) -> int:
    """Cases a split of ``size`` (a count >= 1 or a fraction 0 < f < 1 of ``total``) takes, at least one."""
    count = int(round(total * size)) if isinstance(size, float) and size < 1 else int(size)
    return max(1, count)


def _seeded_pick(total: int, count: int, seed: int) -> List[int]:
    """``count`` of ``range(total)`` chosen by a seeded shuffle, sorted."""
    return sorted(np.random.default_rng(seed).permutation(total)[:count].tolist())


def split_cases(cases: Sequence[CaseRecord], validation: Union[int, float], seed: int) -> Tuple[
        List[CaseRecord], List[CaseRecord]]:
    """Seeded shuffle into ``(training, validation)``; ``validation`` is a case count (int >= 1) or a fraction
    (0 < f < 1). Both parts must be non-empty, otherwise ``DatasetError`` says how many cases are needed."""
    count = _case_count(len(cases), validation)
    if len(cases) - count < 1:
        raise DatasetError(f"{len(cases)} case(s) is too few for a validation split of {count}: training needs at "
                           f"least {count + 1} cases; add cases or lower the validation size")
    chosen = set(_seeded_pick(len(cases), count, seed))
    return ([cases[i] for i in range(len(cases)) if i not in chosen], [cases[i] for i in sorted(chosen)])


@dataclass(frozen=True)
class CaseSplit:
    """Which cases a training run trains on, validates on, and never sees (names).

    ``held_out``: test cases no run of this split trains or validates on. ``folds`` (k-fold runs): every fold's
    validation cases, sorted; fold ``fold`` validates and the other folds train. Everything follows from the
    dataset's case list, ``seed``, the held-out size and the fold count, so separate runs of the folds (on other
    machines too) agree on every list.
    """

    training: List[str]
    validation: List[str]
    held_out: List[str]
    seed: int
    folds: Optional[List[List[str]]] = None
    fold: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        """What ``plan.json`` and the bundle's ``metrics.training.split`` record (training cases are the rest)."""
        record: Dict[str, Any] = {"seed": self.seed, "held_out_cases": list(self.held_out),
                                  "validation_cases": list(self.validation)}
        if self.folds is not None:
            record.update(folds=len(self.folds), fold=self.fold, fold_cases=[list(f) for f in self.folds])
        return record


def plan_split(cases: Sequence[CaseRecord], validation: Union[int, float], seed: int,
               held_out: Union[int, float] = 0, folds: Optional[int] = None,
               fold: Optional[int] = None) -> CaseSplit:
    """The seeded split of ``cases``: first ``held_out`` test cases (a count or a fraction; 0 = none; the same
    cases ``split_cases(cases, held_out, seed)`` validates on), then of the rest either ``validation`` cases
    (``split_cases``) or, with ``folds`` = N, N folds of (nearly) equal size drawn by a shuffle of the sorted
    names seeded with ``(seed, N)``, of which ``fold`` validates. ``DatasetError`` when there are too few cases.
    """
    names = [case.name for case in cases]
    held: List[str] = []
    if held_out:
        count = _case_count(len(names), held_out)
        needed, users = (2, "training and validation") if folds is None else (folds, f"{folds} folds")
        if len(names) - count < needed:
            raise DatasetError(f"{len(names)} case(s) is too few to hold out {count}: {users} need at least "
                               f"{needed} more; add cases or hold out fewer")
        held = [names[i] for i in _seeded_pick(len(names), count, seed)]
    chosen = set(held)
    rest = [case for case in cases if case.name not in chosen]
    if folds is None:
        training, validated = split_cases(rest, validation, seed)
        return CaseSplit([c.name for c in training], [c.name for c in validated], held, seed)
    if len(rest) < folds:
        raise DatasetError(f"{len(rest)} case(s) cannot fill {folds} folds (each fold validates on at least one "
                           "case); add cases or use fewer --folds")
    ordered = sorted(case.name for case in rest)
    order = np.random.default_rng([seed, folds]).permutation(len(ordered))
    fold_cases = [sorted(ordered[i] for i in order[k::folds]) for k in range(folds)]
    index = fold or 0
    validated_names = set(fold_cases[index])
    return CaseSplit([c.name for c in rest if c.name not in validated_names], fold_cases[index], held, seed,
                     fold_cases, index)
