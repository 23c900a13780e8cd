"""Segmenting a batch of files: ``segment_files``, the Python API behind ``attention-unet segment`` (the CLI parses
the options and reports; this validates every input, checks every output, runs the ``Predictor`` on each input,
localised or not, and writes its results through ``outputs``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import AttentionUNetError, CancelledError, InputImageError, InputsFailedError, UsageError, error_message
from ..fileio.jsonfile import read_json
from ..model.bundle import ModelBundle, ModelRegistry, device_memory, estimate_memory
from ..preprocessing.domain import LOCALIZE_MODES, exceeds_field_of_view
from ..progress import scaled
from .outputs import (SUMMARY_NAME, OutputPaths, check_writable, plan_outputs, summary_columns, summary_row,
                      write_prediction, write_summary)


def _dicom_sources(inputs: Sequence[str], series: Optional[str], dicom_seg: bool
                   ) -> Tuple[List[Any], Dict[int, AttentionUNetError]]:
    """The validated ``dicomio.DicomSeries`` of each input that is a DICOM folder (``None`` for volume files, and
    for a folder whose series is refused: its error, by input index, is in the second value so a batch records
    it as that input's failure); ``--series`` and ``--dicom-seg`` are refused where they cannot apply, and
    ``--dicom-seg`` without highdicom."""
    from ..fileio.dicomio import find_series, is_series_input

    folders = [is_series_input(path) for path in inputs]
    if series is not None and not any(folders):
        raise UsageError(f"--series {series} picks a series in a DICOM folder, but no input is a folder; give the "
                         "folder that holds the series")
    if dicom_seg:
        plain = [path for path, folder in zip(inputs, folders) if not folder]
        if plain:
            raise UsageError(f"--dicom-seg writes a DICOM Segmentation of a DICOM series, but {plain[0]} is not a "
                             "DICOM folder; give the series' folder or drop --dicom-seg")
        from .dicomseg import require_highdicom

        require_highdicom()
    sources: List[Any] = []
    errors: Dict[int, AttentionUNetError] = {}
    for index, (path, folder) in enumerate(zip(inputs, folders)):
        try:
            sources.append(find_series(path, series) if folder else None)
        except AttentionUNetError as error:
            sources.append(None)
            errors[index] = error
    return sources, errors


def _study_inputs(inputs: Sequence[str], series: Optional[str]) -> List[str]:
    """``inputs`` with every folder of DICOM studies replaced by its series folders (``dicomio.study_folders``)."""
    from ..fileio.dicomio import is_series_input, study_folders

    return [str(folder) for path in inputs
            for folder in (study_folders(path, series) if is_series_input(path) else [path])]


def _input_stems(inputs: Sequence[str], sources: Sequence[Any]) -> List[str]:
    """File names without their image extension; a DICOM series' description or UID (``DicomSeries.stem``), and
    where several series share a description (one protocol over many studies) with the end of their UID."""
    from ..fileio.imageio import image_stem, safe_name

    stems = [source.stem if source is not None else image_stem(path) for path, source in zip(inputs, sources)]
    folded = [stem.casefold() for stem in stems]  # a case-insensitive disk holds "Case_seg" and "case_seg" as one
    stems = [safe_name(f"{stem}_{source.uid.split('.')[-1][-8:]}")
             if source is not None and folded.count(key) > 1 else stem
             for stem, key, source in zip(stems, folded, sources)]
    folded = [stem.casefold() for stem in stems]
    repeated = sorted({stem for stem, key in zip(stems, folded) if folded.count(key) > 1})
    if repeated:
        raise InputImageError(f"several inputs share the file name stem {repeated[0]!r} (ignoring case), so their "
                              "outputs would collide; rename them or segment them into different --output-dir "
                              "folders")
    return stems


Geometry = Tuple[Tuple[int, ...], Tuple[float, ...], Tuple[float, ...]]


def _geometry(image) -> Geometry:
    return image.GetSize(), image.GetSpacing(), image.GetDirection()


def will_localize(geometry: Geometry, bundle: ModelBundle, localize: str = "auto",
                  roi: Optional[Sequence[float]] = None) -> bool:
    """``--localize auto``: the bundle has a localiser, no ROI was given and the input is larger than the
    model's domain."""
    if not (localize == "auto" and roi is None and bundle.has_localizer):
        return False
    patch_mm = [p * s for p, s in zip(bundle.patch_size, bundle.preprocessing.target_spacing)]
    return exceeds_field_of_view(*geometry, bundle.domain, patch_mm)


def segment_files(inputs: Sequence[str], output_dir: Path, model: Union[str, Path, ModelBundle, None] = None, *,
                  device: str = "auto", overlap: Optional[float] = None, tta: bool = False,
                  batch_size: Optional[int] = None, precision: str = "auto", roi: Optional[Sequence[float]] = None,
                  attention: bool = True, probabilities: bool = False, largest_component: bool = False,
                  fmt: str = "nii.gz", force: bool = False, localize: str = "auto", progress=None,
                  also_reads: Sequence[Union[str, Path]] = (), log: Optional[Callable[[str], None]] = None,
                  series: Optional[str] = None, dicom_seg: bool = False, keep_patient_info: bool = False,
                  report_pdf: bool = False) -> Dict[str, OutputPaths]:
    """Segment every input with one loaded model and write its outputs; returns ``{stem: paths}``.

    ``model`` is a loaded bundle, or the name/path ``ModelRegistry.resolve`` takes (``None``: the default model).
    Every input is validated (before the model is even loaded) and every output name checked before the first
    inference, so a bad input, an existing output, a name the file system cannot hold, or an output that would
    overwrite an input (or a data file an input's header names, or a file in ``also_reads``, e.g. the ROI file),
    fails fast with nothing written. With several inputs, a failure of one input (unreadable, localisation
    refused, out of memory, a write error) is recorded and the others still run; then ``summary.csv`` (one row per
    input, ``outputs.summary_columns``) is written into ``output_dir`` (checked like every output before the first
    inference) and ``InputsFailedError`` raised at the end if any failed. ``report_pdf``: also write
    ``<stem>_report.pdf``. ``localize`` (``auto`` or ``off``, see ``will_localize``) picks per input
    between the localised run (per-side labels) and the plain one; an input that is not localised is checked
    against the model's domain. ``log(line)`` receives the lines for people (the CLI passes its progress
    reporter's ``log``, which prints them above a bar and keeps them out of ``--progress json``'s stdout):
    ``warning: <stem>: <text>`` for every warning of an input (which also goes into its report), ``warning: ...``
    when CUDA runs out of memory and the run retries, and after a successful run the line naming the bundle that
    ran (its path: a model on ``ATTENTION_UNET_MODELS`` may override an installed one) and any warning about it;
    each report records the path as ``model.path``.

    An input that is a folder is read as a DICOM series (``dicomio``; ``series``: its SeriesInstanceUID where the
    folder holds several); its stem is the series description or UID. ``dicom_seg`` (DICOM inputs only) also
    writes ``<stem>_seg.dcm``; patient data goes into no other output unless ``keep_patient_info`` (the report's
    ``patient``).
    """
    from ..fileio.atomic import remove_stale_temporaries

    if localize not in LOCALIZE_MODES:
        raise UsageError(f"--localize {localize} is not one of {', '.join(LOCALIZE_MODES)}")
    progress = progress or (lambda *_: None)
    log = log or (lambda _line: None)
    if report_pdf:
        from .report import require_matplotlib

        require_matplotlib()
    run = _Inputs.gather(inputs, series, dicom_seg, batch_size, probabilities)
    geometries, first = _check_inputs(run, roi, progress)
    progress("load", 0.0, "Loading the model")
    bundle = model if isinstance(model, ModelBundle) else ModelRegistry().resolve(model)
    localized = {stem: will_localize(geometry, bundle, localize, roi) for stem, geometry in geometries.items()}
    num_gates = len(bundle.architecture["channels"]) - 1
    plans = [plan_outputs(output_dir, stem, bundle.localized_labels if local else bundle.labels, fmt,
                          num_gates if attention else 0, probabilities, dicom_seg, report_pdf)
             for stem, local in localized.items()]
    reads = [*run.reads(), *also_reads]
    for plan in plans:
        plan.check_writable(force, reads)
    summary = Path(output_dir) / SUMMARY_NAME if run.batch else None
    if summary is not None:
        check_writable([summary], force, reads)
    remove_stale_temporaries(output_dir)  # a killed earlier run's, even if this one fails before writing
    spec = bundle.localization if any(localized.values()) else None
    template = None
    if spec is not None:
        from ..preprocessing.localization import read_template

        template = read_template(spec)
    predictor = _predictor(bundle, device, overlap, tta, batch_size, precision, log)
    parameters = {"model": bundle.name, "device": device, "overlap": overlap if overlap is not None else bundle.overlap,
                  "tta": tta, "tta_mirror_axes": list(predictor.mirror_axes), "batch_size": batch_size,
                  "precision": precision, "roi": list(roi) if roi is not None else None,
                  "localize": localize, "attention": attention, "probabilities": probabilities,
                  "largest_component": largest_component, "format": fmt, "series": series, "dicom_seg": dicom_seg}
    written: Dict[str, OutputPaths] = {}
    for index, (path, stem) in enumerate(zip(run.paths, run.stems)):
        if stem in run.failed:
            continue
        report = scaled(progress, index / len(run.paths), (index + 1) / len(run.paths))
        started = time.perf_counter()
        report("read", 0.0, f"Reading {Path(path).name}")
        try:
            if first is not None and stem == first.stem:
                image, read_seconds, first = first.image, first.seconds, None
            else:
                image = run.read(index)
                read_seconds = time.perf_counter() - started
            if localized[stem]:
                prediction = _predict_localized(predictor, image, spec, template, attention, probabilities,
                                                largest_component, scaled(report, 0.0, 0.95))
            else:
                prediction = _predict(predictor, image, roi, attention, probabilities, largest_component,
                                      geometries[stem], scaled(report, 0.0, 0.95))
            for text in prediction.warnings:
                log(f"warning: {stem}: {text}")
            prediction.timings = {"read": read_seconds, **prediction.timings}
            report("write", 0.95, f"Writing outputs of {stem}")
            source = run.sources[index]
            written[stem] = write_prediction(
                prediction, bundle, output_dir, stem, fmt=fmt, input_path=path, parameters=parameters, force=force,
                dicom_series=source, dicom_seg=dicom_seg, report_pdf=report_pdf, image=image,
                patient=source.patient_info() if keep_patient_info and source is not None else None)
            report("write", 1.0, f"Wrote outputs of {stem}")
        except Exception as error:  # noqa: BLE001 - record() re-raises all but a batch's per-input failures
            run.record(stem, error)
        image = None
    log(f"model: {bundle.name} {bundle.version} from {bundle.path.resolve()}")
    if bundle.integrity_warning:
        log(f"warning: {bundle.integrity_warning}")
    if summary is not None:
        _write_summary(summary, run.stems, written, run.failed, bundle, force)
    if run.failed:
        names = "; ".join(f"{stem}: {message}" for stem, message in run.failed.items())
        raise InputsFailedError(f"{len(run.failed)} of {len(run.paths)} inputs failed ({names}); the others were "
                                f"segmented, see {summary}", run.failed, written, summary)
    return written


@dataclass
class _Inputs:
    """The inputs of one run, in order: paths (folders of DICOM studies expanded), each one's DICOM series
    (``None`` for a volume file), output stems, the refusal of a series by input index, and the message of each
    input that failed (a batch records them and goes on; a single input's error is raised)."""

    paths: List[str]
    sources: List[Any]
    stems: List[str]
    source_errors: Dict[int, AttentionUNetError]
    batch_size: Optional[int]
    probabilities: bool
    failed: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def gather(cls, inputs: Sequence[str], series: Optional[str], dicom_seg: bool, batch_size: Optional[int],
               probabilities: bool) -> "_Inputs":
        paths = _study_inputs(inputs, series)
        sources, source_errors = _dicom_sources(paths, series, dicom_seg)
        return cls(paths, sources, _input_stems(paths, sources), source_errors, batch_size, probabilities)

    @property
    def batch(self) -> bool:
        return len(self.paths) > 1

    def reads(self) -> List[Union[str, Path]]:
        """What the inputs read: a series' own files (a folder may hold other files, e.g. earlier outputs)."""
        return [file for path, source in zip(self.paths, self.sources)
                for file in (source.files if source else [path])]

    def read(self, index: int) -> Any:
        """Input ``index`` as a ``sitk.Image`` (its series, or the volume file)."""
        from ..fileio.dicomio import read_series
        from ..fileio.imageio import read_image

        source = self.sources[index]
        return read_series(source) if source is not None else read_image(self.paths[index])

    def record(self, stem: str, error: Exception) -> None:
        """Record a batch input's failure, or raise ``error`` (a single input, a cancel, a bug)."""
        message = _input_failure(error, self.batch_size, self.probabilities)
        if not self.batch or message is None:
            raise error
        self.failed[stem] = message


@dataclass
class _FirstImage:
    """The first input that could be read, kept: it is segmented first, so it is read only once."""

    stem: str
    image: Any
    seconds: float


def _check_inputs(run: _Inputs, roi: Optional[Sequence[float]], progress: Any
                  ) -> Tuple[Dict[str, Geometry], Optional[_FirstImage]]:
    """Read and validate every input before the model loads: the grid each one gives the model (with an ROI the
    model sees that region, so the domain guard compares it, not the whole input), by stem."""
    from ..preprocessing.preprocess import crop_to_roi

    first = None
    geometries: Dict[str, Geometry] = {}
    for index, stem in enumerate(run.stems):
        progress("validate", 0.0, f"Checking input {index + 1}/{len(run.paths)}")
        started = time.perf_counter()
        try:
            if index in run.source_errors:
                raise run.source_errors[index]
            image = run.read(index)
            geometries[stem] = _geometry(image if roi is None else crop_to_roi(image, roi)[0])
        except Exception as error:  # noqa: BLE001 - record() re-raises all but a batch's per-input failures
            run.record(stem, error)
            continue
        if first is None:
            first = _FirstImage(stem, image, time.perf_counter() - started)
    return geometries, first


def _predictor(bundle: ModelBundle, device: str, overlap: Optional[float], tta: bool, batch_size: Optional[int],
               precision: str, log: Callable[[str], None]):
    """The ``Predictor``, refused before any inference when its windows need more memory than the device has."""
    from .predictor import Predictor

    predictor = Predictor(bundle, device=device, overlap=overlap, tta=tta, batch_size=batch_size, precision=precision,
                          log=lambda line: log(f"warning: {line}"))
    needed = estimate_memory(bundle.architecture, bundle.patch_size, predictor.batch_size, folds=bundle.fold_count)
    available = device_memory(predictor.device)
    if available is not None and needed > available:
        folds = f" ({bundle.fold_count} folds)" if bundle.fold_count > 1 else ""
        raise AttentionUNetError(
            f"{predictor.batch_size} window(s) of {' x '.join(map(str, bundle.patch_size))} voxels of model "
            f"{bundle.name}{folds} need about {needed / 2**30:.1f} GiB (estimate), more than the "
            f"{available / 2**30:.1f} GiB of {'this GPU' if predictor.device.type == 'cuda' else 'RAM'}; use a "
            "smaller --batch-size" + ("" if predictor.device.type == "cuda" else " or a machine with more memory"))
    return predictor


def _predict(predictor, image, roi: Optional[Sequence[float]], attention: bool, probabilities: bool,
             largest_component: bool, geometry: Geometry, report):
    """Segment ``image`` (or its ``roi``) as it is, then check it against the model's domain."""
    from ..preprocessing.domain import domain_warnings

    prediction = predictor.predict(image, roi=roi, attention=attention, probabilities=probabilities,
                                   largest_component=largest_component, progress=report)
    bundle = predictor.bundle
    prediction.warnings = domain_warnings(*geometry, bundle.domain, localizer=bundle.has_localizer and roi is None)
    return prediction


def _input_failure(error: Exception, batch_size: Optional[int], probabilities: bool) -> Optional[str]:
    """The message that records a batch input's failure, or None for what must end the whole run (a cancel, a
    programming error)."""
    if isinstance(error, CancelledError):
        return None
    return error_message(error, SimpleNamespace(command="segment", batch_size=batch_size,
                                                probabilities=probabilities))


def _write_summary(path: Path, stems: Sequence[str], written: Mapping[str, OutputPaths], failed: Mapping[str, str],
                   bundle: ModelBundle, force: bool) -> None:
    """``summary.csv``: one row per input, in input order."""
    reports = {stem: read_json(paths.report, "report", AttentionUNetError) for stem, paths in written.items()}
    rows = [summary_row(stem, "done", bundle.name, bundle.version, reports[stem]) if stem in reports else
            summary_row(stem, "failed", bundle.name, bundle.version, error=failed.get(stem, "")) for stem in stems]
    write_summary(path, summary_columns(list(reports.values())), rows, force=force)


def _predict_localized(predictor, image, spec, template, attention: bool, probabilities: bool,
                       largest_component: bool, report):
    """Register ``image`` to the bundle's template, check the result, and segment each side's box."""
    from ..preprocessing.localization import check_plausible, map_box, register

    report("localize", 0.0, "Locating the structure (registration to the model's template)")
    registration = register(image, template)
    inside, warnings = check_plausible(registration, image, spec)
    report("localize", 0.3, "Segmenting each side")
    prediction = predictor.predict_localized(image, spec, registration, attention=attention,
                                             probabilities=probabilities, largest_component=largest_component,
                                             progress=scaled(report, 0.3, 1.0))
    prediction.segments = predictor.bundle.localized_labels
    prediction.localization = {
        "method": spec.method,
        "boxes": {side: list(map_box(registration.transform, box)) for side, box in spec.boxes.items()},
        "template_boxes": {side: list(box) for side, box in spec.boxes.items()},
        "box_inside_image": {side: round(share, 3) for side, share in inside.items()},
        "registration": registration.quality(),
    }
    prediction.timings = {"localize": registration.seconds, **prediction.timings}
    prediction.warnings = warnings
    return prediction

