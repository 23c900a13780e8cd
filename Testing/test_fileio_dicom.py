"""DICOM series in, DICOM SEG out: real series written with pydicom (oblique, several in one folder, missing
slices ...), the real MPRAGE series of ``../shared/data/dicom`` where present, the real CLI in a child process, and
every SEG read back with highdicom and with dcmqi's ``segimage2itkimage`` (the converter 3D Slicer's
QuantitativeReporting uses)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from AttentionUNetSegmentLib.fileio import dicomio  # noqa: E402
from AttentionUNetSegmentLib.model.bundle import load_bundle  # noqa: E402
from AttentionUNetSegmentLib.inference.batch import segment_files  # noqa: E402
from AttentionUNetSegmentLib.errors import AttentionUNetError, InputImageError  # noqa: E402
from AttentionUNetSegmentLib.fileio.imageio import files_read_for  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MPRAGE = REPO_ROOT.parent / "shared" / "data" / "dicom" / "mprage_trio"
SHIPPED_MODEL = REPO_ROOT / "AttentionUNetSegment" / "Resources" / "Models" / "hippocampus"
#: Identifying values of the synthetic patient: none may appear in any output but the DICOM SEG.
PATIENT = {"PatientName": "Doe^Jane^Q", "PatientID": "PID-93817264", "PatientBirthDate": "19450317",
           "AccessionNumber": "ACC55512345", "StudyDate": "20240229", "InstitutionName": "St Elsewhere Hospital",
           "ReferringPhysicianName": "House^Gregory", "StudyDescription": "Brain MRI Doe"}
#: How those values may appear in a file (DICOM person names as written, or with spaces).
PATIENT_STRINGS = ["Doe^Jane", "Doe Jane", "Jane", "PID-93817264", "19450317", "ACC55512345", "20240229",
                   "Elsewhere", "House^Gregory"]


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _volume(shape_zyx=(14, 36, 40), seed=0) -> np.ndarray:
    """A blob with noise, int16 (z, y, x)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    blob = np.exp(-((x * 1.5) ** 2 + (y * 1.5) ** 2 + (z * 1.2) ** 2) * 3)
    return (800 * blob + rng.normal(100, 20, shape_zyx)).astype(np.int16)


def write_series(folder: Path, volume: np.ndarray, *, rotation: Optional[np.ndarray] = None,
                 spacing=(0.9, 1.1), step: float = 1.6, origin=(-20.0, 15.0, 30.0), description: str = "T1 axial",
                 series_uid: Optional[str] = None, suffix: str = "", skip: Sequence[int] = (),
                 positions: Optional[Dict[int, Sequence[float]]] = None,
                 orientations: Optional[Dict[int, Sequence[float]]] = None, shuffle: bool = True,
                 rows_override: Optional[Dict[int, int]] = None, study_uid: Optional[str] = None) -> List[Path]:
    """Write ``volume`` (z, y, x) as single-frame MR files: slice k at ``origin + k * step * normal`` with row and
    column directions the first two columns of ``rotation``; ``spacing`` = (column spacing x, row spacing y).
    File names are numbered in a shuffled order (no slice order in the names), without extension unless
    ``suffix``. Overrides make broken series."""
    folder.mkdir(parents=True, exist_ok=True)
    rotation = np.eye(3) if rotation is None else rotation
    row, column, normal = rotation[:, 0], rotation[:, 1], rotation[:, 2]
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    order = np.random.default_rng(1).permutation(volume.shape[0]) if shuffle else np.arange(volume.shape[0])
    written = []
    for number, k in enumerate(order):
        if k in skip:
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        for key, value in PATIENT.items():
            setattr(ds, key, value)
        ds.PatientSex, ds.StudyTime, ds.StudyID = "F", "101010", "1"
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = "MR", "Synthetic", description
        ds.SeriesNumber, ds.InstanceNumber = 7, int(k) + 1
        position = origin + float(k) * step * normal
        if positions and k in positions:
            position = np.asarray(positions[k], float)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        cosines = list(row) + list(column)
        if orientations and k in orientations:
            cosines = list(orientations[k])
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in cosines]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{step:g}"
        pixels = volume[k]
        if rows_override and k in rows_override:
            pixels = np.resize(pixels, (rows_override[k], pixels.shape[1]))
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
        path = folder / f"IM{number:04d}{suffix}"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


OBLIQUE = _rotation((1, 2, 3), 25)


def _cli(*args, env=None, preexec_fn=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", *map(str, args)], capture_output=True,
                          text=True, env=env, preexec_fn=preexec_fn, timeout=timeout)


def _bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def _assert_no_patient_data(folder: Path, *texts: str, allowed=(".dcm",)) -> None:
    """No file of ``folder`` but the DICOM SEG, and none of ``texts`` (stdout/stderr), holds a patient string."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.endswith(allowed):
            content = _bytes(path)
            for needle in PATIENT_STRINGS:
                assert needle.encode() not in content, f"{needle!r} found in {path.name}"
    for text in texts:
        for needle in PATIENT_STRINGS:
            assert needle not in text, f"{needle!r} found in the program's output"


def _segimage2itkimage() -> str:
    pytest.importorskip("dcmqi")
    found = shutil.which("segimage2itkimage", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                    os.environ.get("PATH", "")]))
    if found is None:
        import dcmqi

        candidate = Path(dcmqi.__file__).parent / "bin" / "segimage2itkimage"
        found = str(candidate) if candidate.is_file() else None
    if found is None:
        pytest.skip("dcmqi's segimage2itkimage is not installed")
    return found


def _dcmqi_labels(seg_path: Path, reference: sitk.Image, work: Path) -> tuple:
    """The SEG converted by dcmqi, each segment pasted onto ``reference``'s grid (nearest neighbour, exact when
    the grids agree): ``(label map of segment numbers, segment attributes of dcmqi's meta.json, images)``."""
    work.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([_segimage2itkimage(), "--inputDICOM", str(seg_path), "--outputDirectory", str(work),
                           "-t", "nrrd", "-p", "seg"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    meta = json.loads((work / "seg-meta.json").read_text())
    attributes = [group[0] for group in meta["segmentAttributes"]]
    merged = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.int32)
    images = {}
    for attribute in attributes:
        image = sitk.ReadImage(str(work / f"seg-{attribute['labelID']}.nrrd"))
        images[attribute["labelID"]] = image
        pasted = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        mask = sitk.GetArrayFromImage(pasted) > 0
        assert mask.sum() == (sitk.GetArrayViewFromImage(image) > 0).sum(), "a segment fell off the source grid"
        assert not (merged[mask] > 0).any()
        merged[mask] = attribute["labelID"]
    return merged, attributes, images


def _assert_same_grid(image: sitk.Image, series: dicomio.DicomSeries, tolerance: float = 1e-4) -> None:
    """``image``'s voxel planes are the series' slices: same spacing and direction, origin on the grid."""
    np.testing.assert_allclose(image.GetSpacing(), series.spacing, atol=tolerance)
    np.testing.assert_allclose(image.GetDirection(), series.direction, atol=tolerance)
    offset = np.asarray(image.GetOrigin()) - np.asarray(series.origin)
    index = np.asarray(series.direction).reshape(3, 3).T @ offset / np.asarray(series.spacing)
    np.testing.assert_allclose(index, np.round(index), atol=tolerance)


# ------------------------------------------------------------------------------------------------ reading series
def test_oblique_series_reads_in_slice_order_with_the_geometry_of_its_tags(tmp_path):
    volume = _volume()
    folder = tmp_path / "oblique"
    write_series(folder, volume, rotation=OBLIQUE, suffix="")  # names without .dcm, shuffled
    series = dicomio.find_series(folder)
    image = dicomio.read_series(series)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), volume)
    np.testing.assert_allclose(image.GetSpacing(), (0.9, 1.1, 1.6), atol=1e-6)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), OBLIQUE, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (-20.0, 15.0, 30.0), atol=1e-5)
    # voxel (i, j, k) is where slice k's header puts pixel (column i, row j)
    first_of = {int(pydicom.dcmread(p).InstanceNumber) - 1: p for p in folder.iterdir()}
    ds = pydicom.dcmread(first_of[9])
    expected = np.array([float(v) for v in ds.ImagePositionPatient]) + 3 * 0.9 * OBLIQUE[:, 0] + 5 * 1.1 * OBLIQUE[:, 1]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((3, 5, 9)), expected, atol=1e-5)
    assert series.stem == "T1_axial" and series.files[9] == first_of[9]
    assert image.GetMetaDataKeys() == ()  # no DICOM tag travels with the volume (into NRRD outputs)


def test_files_read_for_a_series_folder_are_its_image_files_only(tmp_path):
    folder = tmp_path / "series"
    files = write_series(folder, _volume((6, 20, 24)), suffix=".dcm")
    (folder / "notes.txt").write_text("not DICOM")
    assert sorted(files_read_for(folder)) == sorted(files)


def _broken(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    volume = _volume((10, 20, 24))
    if kind == "missing slice":
        write_series(folder, volume, skip=[6])
    elif kind == "uneven spacing":
        write_series(folder, volume, positions={9: (-20.0, 15.0, 30.0 + 9 * 1.6 + 0.9)})
    elif kind == "mixed orientation":
        tilted = _rotation((1, 0, 0), 20)
        write_series(folder, volume, orientations={4: list(tilted[:, 0]) + list(tilted[:, 1])})
    elif kind == "differing sizes":
        write_series(folder, volume, rows_override={3: 16})
    elif kind == "repeated position":
        write_series(folder, volume, positions={5: (-20.0, 15.0, 30.0 + 4 * 1.6)})
    elif kind == "gantry tilt":
        write_series(folder, volume, positions={k: (-20.0, 15.0 + 0.5 * k, 30.0 + 1.6 * k) for k in range(10)})
    elif kind == "no series":
        folder.mkdir()
        (folder / "readme.txt").write_text("these are not DICOM files")
        (folder / "scan.nii").write_bytes(b"\0" * 400)
    elif kind == "single image":
        write_series(folder, volume[:1])
    elif kind == "not unit cosines":
        write_series(folder, volume, orientations={k: [2, 0, 0, 0, 2, 0] for k in range(10)})
    elif kind == "multi-frame":
        path = write_series(folder, volume[:1])[0]
        ds = pydicom.dcmread(path)
        ds.NumberOfFrames = 10
        ds.PixelData = np.ascontiguousarray(volume, dtype="<i2").tobytes()
        ds.save_as(path, enforce_file_format=True)
    return folder


BROKEN = {"missing slice": "slices are missing", "uneven spacing": "uneven slice positions",
          "mixed orientation": "mixes image orientations", "differing sizes": "differ in size",
          "repeated position": "several images at one position", "gantry tilt": "not stacked along its slice normal",
          "no series": "no DICOM image series", "single image": "single image", "multi-frame": "multi-frame image",
          "not unit cosines": "not two unit vectors"}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_series_are_refused_with_what_and_how(tmp_path, kind):
    folder = _broken(tmp_path, kind)
    with pytest.raises(InputImageError, match=BROKEN[kind]):
        dicomio.find_series(folder)


@pytest.mark.parametrize("kind", ["missing slice", "no series", "mixed orientation"])
def test_broken_series_cli_gives_one_error_line_and_writes_nothing(tmp_path, tiny_bundle, kind):
    folder = _broken(tmp_path, kind)
    out = tmp_path / "out"
    done = _cli("segment", folder, "--output-dir", out, "--model", tiny_bundle.path, "--device", "cpu")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()  # nothing of ITK's own warnings
    assert len(lines) == 1 and lines[0].startswith("error: ") and BROKEN[kind] in lines[0], done.stderr
    assert not out.exists()


def test_several_series_are_listed_in_one_error_and_series_picks_one(tmp_path, tiny_bundle):
    folder = tmp_path / "study"
    study = generate_uid()
    first = write_series(folder, _volume((8, 20, 24), seed=1), description="T1 axial", study_uid=study)
    second = write_series(folder / "tmp", _volume((5, 20, 24), seed=2), description="FLAIR", study_uid=study,
                          rotation=OBLIQUE)
    for path in second:  # the same folder, other file names
        path.rename(folder / f"F{path.name}")
    (folder / "tmp").rmdir()
    uids = {pydicom.dcmread(first[0]).SeriesInstanceUID: ("T1 axial", 8),
            pydicom.dcmread(folder / f"F{second[0].name}").SeriesInstanceUID: ("FLAIR", 5)}
    out = tmp_path / "out"
    done = _cli("segment", folder, "--output-dir", out, "--model", tiny_bundle.path, "--device", "cpu")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--series UID" in lines[0]
    for uid, (description, count) in uids.items():
        assert f"{uid} ({description}, {count} files)" in lines[0]
    assert not any(needle in done.stderr for needle in PATIENT_STRINGS)
    assert not out.exists()
    flair = next(uid for uid, (description, _) in uids.items() if description == "FLAIR")
    written = segment_files([str(folder)], out, tiny_bundle, device="cpu", series=flair, attention=False)
    labels = sitk.ReadImage(str(written["FLAIR"].segmentation))
    assert labels.GetSize() == (24, 20, 5)
    np.testing.assert_allclose(np.array(labels.GetDirection()).reshape(3, 3), OBLIQUE, atol=1e-6)
    with pytest.raises(InputImageError, match="not a DICOM image series"):
        segment_files([str(folder)], tmp_path / "out2", tiny_bundle, device="cpu", series="1.2.3.4")


def test_a_folder_of_studies_is_one_input_per_series_with_a_summary(tmp_path, tiny_bundle):
    studies = tmp_path / "studies"
    first = write_series(studies / "patient_a" / "mr1", _volume((6, 20, 24), seed=1), description="T1 axial")
    write_series(studies / "patient_b", _volume((5, 20, 24), seed=2), description="T1 axial")
    (studies / "notes").mkdir()  # a folder without DICOM files is passed over
    out = tmp_path / "out"
    done = _cli("segment", studies, "--output-dir", out, "--model", tiny_bundle.path, "--device", "cpu",
                "--no-attention", "--progress", "none")
    assert done.returncode == 0, done.stderr
    with open(out / "summary.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["status"] for row in rows] == ["done", "done"]
    # one protocol over several studies: the stems keep the description and tell the series apart by UID
    uid_a = pydicom.dcmread(first[0]).SeriesInstanceUID
    assert rows[0]["input"] == f"T1_axial_{uid_a.split('.')[-1][-8:]}"
    assert rows[0]["input"] != rows[1]["input"] and rows[1]["input"].startswith("T1_axial_")
    sizes = sorted(sitk.ReadImage(str(out / f"{row['input']}_seg.nii.gz")).GetSize()[2] for row in rows)
    assert sizes == [5, 6]
    assert not any(needle in done.stderr + done.stdout for needle in PATIENT_STRINGS)


def test_voxel_cap_is_applied_to_the_tags_before_any_pixel_is_read(tmp_path, tiny_bundle):
    folder = tmp_path / "huge"
    files = write_series(folder, _volume((12, 20, 24)))
    for path in files:  # headers declare 60000 x 60000 pixels per slice (43 G voxels); the pixels are tiny
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 60000
        ds.save_as(path, enforce_file_format=True)

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    out = tmp_path / "out"
    done = _cli("segment", folder, "--output-dir", out, "--model", tiny_bundle.path, "--device", "cpu",
                preexec_fn=limit_memory)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "60000 x 60000 x 12" in lines[0] and "ATTENTION_UNET_MAX_VOXELS" in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- segment + SEG
@pytest.fixture(scope="module")
def oblique_run(tmp_path_factory, tiny_bundle):
    """The CLI on an oblique synthetic series with --dicom-seg (NRRD outputs, which carry any metadata)."""
    pytest.importorskip("highdicom")
    root = tmp_path_factory.mktemp("dicom-run")
    folder = root / "series"
    volume = _volume((16, 40, 44))
    write_series(folder, volume, rotation=OBLIQUE, suffix=".dcm", description="T1 MPRAGE/sag 1mm")
    out = root / "out"
    done = _cli("segment", folder, "--output-dir", out, "--model", tiny_bundle.path, "--device", "cpu",
                "--dicom-seg", "--format", "nrrd", "--probabilities")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"folder": folder, "out": out, "done": done, "series": dicomio.find_series(folder),
            "bundle": tiny_bundle, "stem": "T1_MPRAGE_sag_1mm"}


def test_dicom_run_writes_every_output_with_the_series_stem_and_grid(oblique_run):
    out, stem, series = oblique_run["out"], oblique_run["stem"], oblique_run["series"]
    report = json.loads((out / f"{stem}_report.json").read_text())
    assert report["files"]["dicom_segmentation"] == f"{stem}_seg.dcm"
    assert report["dicom"] == {"series_instance_uid": series.uid, "series_description": "T1 MPRAGE/sag 1mm",
                               "modality": "MR", "files": 16}
    assert "patient" not in report
    labels = sitk.ReadImage(str(out / f"{stem}_seg.nrrd"))
    assert labels.GetSize() == series.size
    np.testing.assert_allclose(labels.GetOrigin(), series.origin, atol=1e-5)
    np.testing.assert_allclose(labels.GetDirection(), series.direction, atol=1e-6)


def test_no_output_but_the_seg_holds_patient_data(oblique_run):
    done = oblique_run["done"]
    assert [line.split(" ")[0] for line in done.stderr.strip().splitlines()] == ["model:"]  # no library noise
    _assert_no_patient_data(oblique_run["out"], done.stdout, done.stderr)
    seg = (oblique_run["out"] / f"{oblique_run['stem']}_seg.dcm").read_bytes()
    assert b"Doe^Jane^Q" in seg and b"PID-93817264" in seg  # the SEG's patient module is the source's


def test_seg_reads_back_with_highdicom_voxels_references_and_metadata(oblique_run):
    import highdicom as hd

    out, stem, series = oblique_run["out"], oblique_run["stem"], oblique_run["series"]
    seg = hd.seg.segread(str(out / f"{stem}_seg.dcm"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{stem}_seg.nrrd")))
    assert seg.SeriesInstanceUID != series.uid and seg.StudyInstanceUID == pydicom.dcmread(series.files[0]).StudyInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid and referenced == set(series.instance_uids)
    bundle = oblique_run["bundle"]
    assert [d.SegmentLabel for d in seg.SegmentSequence] == [label.name for label in bundle.labels]
    for description, label in zip(seg.SegmentSequence, bundle.labels):
        # the tiny bundle has no terminology: the generic code
        assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"
        rgb = hd.color.CIELabColor.from_dicom_value(description.RecommendedDisplayCIELabValue).to_rgb()
        np.testing.assert_allclose(rgb, [255 * c for c in label.color], atol=2)
        algorithm = description.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("tiny", "0.0.1")
        assert "AttentionUNet 0." in algorithm.AlgorithmParameters
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=series.instance_uids,
                                               combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, labels)  # segment numbers = label values 1, 2 here


def test_seg_reads_back_with_dcmqi_as_the_label_map_on_the_source_grid(oblique_run, tmp_path):
    out, stem, series = oblique_run["out"], oblique_run["stem"], oblique_run["series"]
    reference = sitk.ReadImage(str(out / f"{stem}_seg.nrrd"))
    merged, attributes, images = _dcmqi_labels(out / f"{stem}_seg.dcm", reference, tmp_path / "dcmqi")
    np.testing.assert_array_equal(merged, sitk.GetArrayViewFromImage(reference))
    for image in images.values():
        _assert_same_grid(image, series)
    assert [a["SegmentLabel"] for a in attributes] == ["Anterior", "Posterior"]
    assert attributes[0]["SegmentedPropertyCategoryCodeSequence"]["CodeMeaning"] == "Tissue"


def test_keep_patient_info_puts_the_patient_into_the_report_only(tmp_path, tiny_bundle):
    folder = tmp_path / "series"
    write_series(folder, _volume((6, 20, 24)))
    written = segment_files([str(folder)], tmp_path / "out", tiny_bundle, device="cpu", attention=False,
                            keep_patient_info=True)
    report = json.loads(written["T1_axial"].report.read_text())
    assert report["patient"] == {"name": "Doe^Jane^Q", "id": "PID-93817264", "birth_date": "19450317",
                                 "study_date": "20240229"}


def test_localised_labels_1_to_4_with_laterality_round_trip_through_dcmqi(tmp_path):
    """The shipped model's per-side labels (values 1-4, terminology with Left/Right modifiers) on an oblique
    series, written by the real SEG writer and converted back by dcmqi."""
    pytest.importorskip("highdicom")
    from AttentionUNetSegmentLib.inference.dicomseg import build_segmentation, save_segmentation

    folder = tmp_path / "series"
    write_series(folder, _volume((12, 30, 32)), rotation=OBLIQUE)
    series = dicomio.find_series(folder)
    image = dicomio.read_series(series)
    labels = np.zeros((12, 30, 32), np.uint8)
    labels[2:5, 4:10, 3:9], labels[2:5, 4:10, 9:14] = 1, 2
    labels[6:9, 15:25, 18:24], labels[9:11, 15:25, 18:24] = 3, 4
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    segments = load_bundle(SHIPPED_MODEL).localized_labels
    segmentation = build_segmentation(label_image, segments, series, "hippocampus", "1.0.0")
    save_segmentation(segmentation, tmp_path / "seg.dcm", tmp_path / "seg.dcm")
    merged, attributes, images = _dcmqi_labels(tmp_path / "seg.dcm", label_image, tmp_path / "dcmqi")
    np.testing.assert_array_equal(merged, labels)
    for image_k in images.values():
        _assert_same_grid(image_k, series)
    assert [a["SegmentLabel"] for a in attributes] == [s.name for s in segments]
    assert [a["SegmentedPropertyTypeModifierCodeSequence"]["CodeMeaning"] for a in attributes] == \
        ["Left", "Left", "Right", "Right"]
    assert {a["SegmentedPropertyTypeCodeSequence"]["CodeValue"] for a in attributes} == {"5976002"}
    assert {a["SegmentedPropertyCategoryCodeSequence"]["CodeValue"] for a in attributes} == {"123037004"}


def test_label_values_without_a_segment_and_other_grids_are_refused(tmp_path, tiny_bundle):
    pytest.importorskip("highdicom")
    from AttentionUNetSegmentLib.inference.dicomseg import build_segmentation

    folder = tmp_path / "series"
    write_series(folder, _volume((6, 20, 24)))
    series = dicomio.find_series(folder)
    labels = sitk.Image(series.size, sitk.sitkUInt8)
    labels.SetOrigin(series.origin)
    labels.SetSpacing(series.spacing)
    labels[2, 2, 2] = 7
    with pytest.raises(AttentionUNetError, match=r"value\(s\) \[7\]"):
        build_segmentation(labels, tiny_bundle.labels, series, "tiny", "0.0.1")
    labels[2, 2, 2] = 1
    labels.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(AttentionUNetError, match="not on the grid"):
        build_segmentation(labels, tiny_bundle.labels, series, "tiny", "0.0.1")


# ---------------------------------------------------------------------------------------- refusals and overwrites
def test_dicom_seg_needs_dicom_input_and_says_so_before_inference(tmp_path, tiny_bundle):
    volume = sitk.GetImageFromArray(_volume((8, 20, 24)).astype(np.float32))
    sitk.WriteImage(volume, str(tmp_path / "case.nii.gz"))
    out = tmp_path / "out"
    done = _cli("segment", tmp_path / "case.nii.gz", "--output-dir", out, "--model", tiny_bundle.path, "--dicom-seg")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--dicom-seg" in lines[0] and "not a DICOM folder" in lines[0]
    assert not out.exists()
    done = _cli("segment", tmp_path / "case.nii.gz", "--output-dir", out, "--model", tiny_bundle.path,
                "--series", "1.2.3")
    assert done.returncode == 2 and "no input is a folder" in done.stderr and not out.exists()


def test_missing_highdicom_is_one_error_naming_the_extra(tmp_path, tiny_bundle):
    folder = tmp_path / "series"
    write_series(folder, _volume((6, 20, 24)))
    out = tmp_path / "out"
    code = ("import sys; sys.modules['highdicom'] = None; from AttentionUNetSegmentLib.cli.commands import main; "
            f"sys.exit(main(['segment', {str(folder)!r}, '--output-dir', {str(out)!r}, '--model', "
            f"{str(tiny_bundle.path)!r}, '--dicom-seg']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "attention-unet-segment[dicom]"' in lines[0]
    assert not out.exists()


def test_outputs_never_replace_a_file_of_the_series_even_with_force(tmp_path, tiny_bundle):
    folder = tmp_path / "series"
    files = write_series(folder, _volume((6, 20, 24)), description="T1")
    victim = files[2].rename(folder / "T1_seg.dcm")  # a series file named like the SEG output
    before = victim.read_bytes()
    done = _cli("segment", folder, "--output-dir", folder, "--model", tiny_bundle.path, "--device", "cpu",
                "--dicom-seg", "--force")
    assert done.returncode == 2 and "would overwrite the input" in done.stderr
    assert victim.read_bytes() == before and sorted(folder.iterdir()) == sorted([*files[:2], victim, *files[3:]])


def test_a_rerun_into_the_series_folder_replaces_only_its_own_outputs(tmp_path, tiny_bundle):
    pytest.importorskip("highdicom")
    folder = tmp_path / "series"
    files = write_series(folder, _volume((6, 20, 24)), description="T1")
    for attempt in range(2):  # the first run's SEG lies among the series' files: not an image series, not an input
        written = segment_files([str(folder)], folder, tiny_bundle, device="cpu", attention=False, dicom_seg=True,
                                force=attempt == 1)
    assert written["T1"].dicom_segmentation.is_file()
    assert sorted(files_read_for(folder)) == sorted(files)


# -------------------------------------------------------------------------------------------- the real MPRAGE
@pytest.fixture(scope="module")
def mprage():
    if not (MPRAGE / "00001.dcm").is_file():
        pytest.skip(f"shared DICOM series not found at {MPRAGE}")
    return MPRAGE


@pytest.mark.slow  # 23-64 s on the shared 2-core machine (176 files, 256 x 256 x 176)
def test_real_mprage_series_to_seg_round_trips_through_highdicom_and_dcmqi(mprage, tmp_path, tiny_bundle):
    """176 real Siemens files (sagittal, oblique): read, segmented in a box (the tiny model), written as SEG and
    read back by both readers on the source grid; no patient string of the series in the other outputs."""
    pytest.importorskip("highdicom")
    import highdicom as hd

    out = tmp_path / "out"
    done = _cli("segment", mprage, "--output-dir", out, "--model", tiny_bundle.path, "--device", "cpu",
                "--roi", "-40", "0", "-40", "0", "-30", "10", "--dicom-seg", "--format", "nrrd")
    assert done.returncode == 0, done.stderr[-3000:]
    series = dicomio.find_series(mprage)
    stem = "t1_MPRAGEcr_noGRAPPA"
    labels = sitk.ReadImage(str(out / f"{stem}_seg.nrrd"))
    assert labels.GetSize() == (256, 256, 176)
    patient = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    secrets = [str(patient.PatientName), patient.PatientID, patient.PatientBirthDate, "Rorden"]
    for path in out.iterdir():
        if path.suffix != ".dcm":
            assert not any(s.encode() in _bytes(path) for s in secrets), path.name
    assert not any(s in done.stderr + done.stdout for s in secrets)
    seg = hd.seg.segread(str(out / f"{stem}_seg.dcm"))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=series.instance_uids,
                                               combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, sitk.GetArrayViewFromImage(labels))
    merged, _, images = _dcmqi_labels(out / f"{stem}_seg.dcm", labels, tmp_path / "dcmqi")
    np.testing.assert_array_equal(merged, sitk.GetArrayViewFromImage(labels))
    for image in images.values():
        _assert_same_grid(image, series)


@pytest.mark.slow
def test_real_mprage_localised_with_the_shipped_model_writes_four_lateral_segments(mprage, tmp_path):
    """Whole-head inference with the shipped hippocampus model (registration, both sides) to a DICOM SEG."""
    pytest.importorskip("highdicom")
    out = tmp_path / "out"
    done = _cli("segment", mprage, "--output-dir", out, "--device", "cpu", "--dicom-seg", "--no-attention",
                timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    stem = "t1_MPRAGEcr_noGRAPPA"
    labels = sitk.ReadImage(str(out / f"{stem}_seg.nii.gz"))
    report = json.loads((out / f"{stem}_report.json").read_text())
    assert report["localization"] is not None and report["dicom"]["files"] == 176
    merged, attributes, _ = _dcmqi_labels(out / f"{stem}_seg.dcm", labels, tmp_path / "dcmqi")
    np.testing.assert_array_equal(merged, sitk.GetArrayViewFromImage(labels))
    assert [a["SegmentedPropertyTypeModifierCodeSequence"]["CodeMeaning"] for a in attributes] == \
        ["Left", "Left", "Right", "Right"]
    assert all(row["voxels"] > 0 for row in report["segments"])


# ------------------------------------------------------------------------------------------ the dicom-seg command
def test_dicom_seg_command_writes_a_seg_of_a_label_map_given_with_slices_reversed(tmp_path):
    """What the Slicer module's Export runs: files listed in an @file, segments from JSON, a label map whose slice
    axis runs the other way (same voxels): the SEG holds the same labels on the series' grid."""
    pytest.importorskip("highdicom")
    from AttentionUNetSlicer.engineProcess import buildDicomSegCommand

    folder = tmp_path / "series"
    files = write_series(folder, _volume((10, 24, 28)), rotation=OBLIQUE)
    series = dicomio.find_series(folder)
    labels = np.zeros((10, 24, 28), np.uint8)
    labels[2:6, 5:12, 4:9], labels[5:9, 14:20, 15:25] = 5, 9
    image = sitk.GetImageFromArray(labels)
    image.SetOrigin(series.origin)
    image.SetSpacing(series.spacing)
    image.SetDirection(series.direction)
    flipped = sitk.Flip(image, [False, False, True])  # k runs the other way: another index order, same voxels
    assert flipped.GetOrigin() != image.GetOrigin()
    sitk.WriteImage(flipped, str(tmp_path / "labels.nrrd"))
    (tmp_path / "segments.json").write_text(json.dumps([
        {"value": 5, "name": "Lesion", "color": [1.0, 0.0, 0.0],
         "terminology": "Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^"
                        "Morphologically Altered Structure~SCT^52988006^Lesion~^^~Anatomic codes - DICOM master "
                        "list~SCT^12738006^Brain~^^"},
        {"value": 9, "name": "Edited", "color": [0.0, 0.5, 1.0]}]))
    (tmp_path / "sources.txt").write_text("".join(f"{path}\n" for path in reversed(files)))
    output = tmp_path / "export" / "edited_seg.dcm"
    command = buildDicomSegCommand(str(tmp_path / "labels.nrrd"), str(tmp_path / "sources.txt"),
                                   str(tmp_path / "segments.json"), str(output), ("tiny", "0.0.1"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["stage"] == "done" and record["outputs"]["dicom_segmentation"] == str(output.resolve())
    merged, attributes, images = _dcmqi_labels(output, image, tmp_path / "dcmqi")
    np.testing.assert_array_equal(merged, np.where(labels == 5, 1, np.where(labels == 9, 2, 0)))
    for image_k in images.values():
        _assert_same_grid(image_k, series)
    assert attributes[0]["SegmentedPropertyTypeCodeSequence"]["CodeMeaning"] == "Lesion"
    assert attributes[1]["SegmentedPropertyTypeCodeSequence"]["CodeMeaning"] == "Tissue"
    import highdicom as hd

    seg = hd.seg.segread(str(output))
    assert seg.SegmentSequence[0].AnatomicRegionSequence[0].CodeMeaning == "Brain"
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_dicom_seg_command_refuses_labels_on_another_grid(tmp_path):
    pytest.importorskip("highdicom")
    folder = tmp_path / "series"
    write_series(folder, _volume((6, 20, 24)))
    image = sitk.Image([24, 20, 6], sitk.sitkUInt8)
    image.SetOrigin((100.0, 0.0, 0.0))
    sitk.WriteImage(image, str(tmp_path / "labels.nrrd"))
    (tmp_path / "segments.json").write_text(json.dumps([{"value": 1, "name": "A", "color": [1, 0, 0]}]))
    done = _cli("dicom-seg", tmp_path / "labels.nrrd", "--source", folder, "--segments", tmp_path / "segments.json",
                "--algorithm", "tiny", "1", "--output", tmp_path / "out.dcm")
    assert done.returncode == 2 and "not on the grid" in done.stderr and not (tmp_path / "out.dcm").exists()


def test_the_dicom_extra_names_this_distribution_and_matches_the_slicer_requirements():
    tomllib = pytest.importorskip("tomllib")
    from AttentionUNetSegmentLib.inference.dicomseg import DISTRIBUTION

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    extra = [entry.split(";")[0].strip() for entry in project["optional-dependencies"]["dicom"]]
    lines = (REPO_ROOT / "AttentionUNetSegment" / "Resources" / "requirements-dicom.txt").read_text().splitlines()
    assert [line for line in lines if line and not line.startswith("#")] == extra
    assert {"highdicom", "pydicom", "dcmqi"} <= {entry.split(">")[0] for entry in project["optional-dependencies"]["test"]}
