"""The ``attention-unet`` command line (also ``python -m AttentionUNetSegmentLib``).

Subcommands: ``segment`` and ``dicom-seg`` (contract in ``DESIGN.md``), ``models``, ``devices``, ``summary``,
``gradcheck``, ``demo``, and ``train``, ``evaluate``, ``ensemble`` (their options and runs in ``cli/train.py``,
``cli/evaluate.py``, ``cli/ensemble.py``, imported only when they run).

Every user-facing error (an ``AttentionUNetError``, or a misused option) ends the program with exit status 2 and a
single ``error: ...`` line on stderr, with no traceback. Heavy modules (torch, the network, inference) are imported
only by the subcommands that need them, so ``models`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple

from .. import __version__
from ..constants import DEFAULT_MODEL, DEVICES, OUTPUT_FORMATS, PRECISIONS
from ..errors import (AttentionUNetError, CancelledError, InputImageError, InputsFailedError, OutputExistsError,
                      UsageError, error_message)
from ..fileio.jsonfile import read_json
from ..inference.batch import segment_files
from ..inference.outputs import SUMMARY_NAME, OutputPaths
from ..model.bundle import RESOURCES_DIR, ModelBundle, ModelRegistry
from ..preprocessing.domain import LOCALIZE_MODES
from ..progress import PROGRESS_KINDS, default_progress_kind, make_progress
from .arguments import positive_int

#: Where the demo's sample volume is (next to the bundled models).
SAMPLE_DATA_DIR = RESOURCES_DIR / "SampleData"
EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose misuse errors follow the engine's rule: one ``error:`` line, exit status 2, and that takes
    every negative number as a value, not an option (argparse's own test misses ``-1e3``, so ``--roi -1e3 ...``
    failed; no option of this tool starts with a digit or a dot)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ----------------------------------------------------------------------------------------------------------- ROI
def _ras_box_from_markups(path: Path) -> Tuple[float, ...]:
    """The RAS bounding box ``(r_min, r_max, a_min, a_max, s_min, s_max)`` of the first ROI in a Slicer
    ``.mrk.json`` file (rotated ROIs give the box that encloses them)."""
    document = read_json(path, "--roi file", UsageError)
    try:
        roi = next(m for m in document["markups"] if m.get("type") == "ROI")
        center = [float(c) for c in roi["center"]]
        size = [float(s) for s in roi["size"]]
        rows = roi.get("orientation", [1, 0, 0, 0, 1, 0, 0, 0, 1])
        rotation = [[float(rows[3 * i + j]) for j in range(3)] for i in range(3)]
        if len(center) != 3 or len(size) != 3:
            raise ValueError("center and size need three values")
    except (KeyError, StopIteration, TypeError, ValueError, IndexError, AttributeError) as error:
        raise UsageError(f"--roi {path} is not a readable Slicer Markups ROI file ({error}); save the ROI from "
                         "Slicer as .mrk.json or give six numbers R_MIN R_MAX A_MIN A_MAX S_MIN S_MAX") from None
    # Half-extent along each world axis of a box whose axes are the rotation's columns.
    half = [sum(abs(rotation[i][j]) * size[j] / 2.0 for j in range(3)) for i in range(3)]
    if roi.get("coordinateSystem", "LPS").upper() == "LPS":
        center = [-center[0], -center[1], center[2]]
    return tuple(v for i in range(3) for v in (center[i] - half[i], center[i] + half[i]))


def _roi_files(values: Optional[Sequence[str]]) -> List[str]:
    """The ``--roi`` Markups file, if one was given (the run reads it, so no output may replace it)."""
    return list(values) if values and len(values) == 1 else []


def parse_roi(values: Optional[Sequence[str]]) -> Optional[Tuple[float, ...]]:
    """``--roi`` as ``(r_min, r_max, a_min, a_max, s_min, s_max)`` in RAS mm: six numbers, or one markups file."""
    if not values:
        return None
    if len(values) == 1:
        path = Path(values[0])
        if not path.exists():
            raise UsageError(f"--roi file {path} does not exist; give a Slicer .mrk.json ROI file or six numbers "
                             "R_MIN R_MAX A_MIN A_MAX S_MIN S_MAX (RAS mm)")
        return _ras_box_from_markups(path)
    try:
        box = tuple(float(v) for v in values)
    except ValueError:
        box = ()
    if len(box) != 6 or not all(math.isfinite(v) for v in box) or any(box[2 * i] >= box[2 * i + 1] for i in range(3)):
        raise UsageError(f"--roi {' '.join(values)} is not a box: give six numbers R_MIN R_MAX A_MIN A_MAX S_MIN "
                         "S_MAX in RAS millimetres with each minimum below its maximum")
    return box


# ------------------------------------------------------------------------------------------------------- segment
def _overlap(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"overlap must be in [0, 1), got {text}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="NAME|PATH",
                        help=f"installed model name or bundle directory (default: {DEFAULT_MODEL})")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the network runs; auto = CUDA when available (default: auto)")
    parser.add_argument("--progress", choices=PROGRESS_KINDS, default=None,
                        help="bar (terminal, with ETA), json (one object per line on stdout), none "
                             "(default: bar on a terminal, else none)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing outputs of this tool (never an input or a file it reads)")


def _configure_segment(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="3D volumes (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .mgz) or folders holding a DICOM "
                             "series")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for the outputs (created if needed)")
    _add_model_options(parser)
    _add_run_options(parser)
    parser.add_argument("--overlap", type=_overlap, default=None,
                        help="sliding-window overlap as a fraction of the patch (default: the model's, usually 0.5)")
    parser.add_argument("--tta", action="store_true",
                        help="mirror test-time augmentation along the axes the model was trained to be mirrored "
                             "along (inference.mirror_axes; 2x slower per axis)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="windows per forward pass")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="arithmetic of the network: auto = bf16 (fp16 where unsupported) autocast on CUDA, "
                             "fp32 on the CPU (default: auto)")
    parser.add_argument("--roi", nargs="+", metavar="V",
                        help="segment only this box: R_MIN R_MAX A_MIN A_MAX S_MIN S_MAX (RAS mm) or a Slicer "
                             ".mrk.json ROI file; a box up to 1.25 times the model's field of view is segmented in "
                             "one window centred on it, a larger one with sliding windows")
    parser.add_argument("--localize", choices=LOCALIZE_MODES, default="auto",
                        help="auto: when the model has a localiser and the input's field of view is larger than "
                             "the model's training data (a whole head), find the structure by registration to the "
                             "model's template and segment each side (left and right labels); off: segment the "
                             "whole input as given. --roi overrides it (default: auto)")
    parser.add_argument("--no-attention", action="store_true", help="do not write attention maps")
    parser.add_argument("--probabilities", action="store_true", help="also write per-class probability maps")
    parser.add_argument("--largest-component", action="store_true",
                        help="keep only the largest connected component of every label (with localisation: per "
                             "side the component of the side's labels together that is large and nearest the box "
                             "centre)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="nii.gz", help="image format (default: nii.gz)")
    parser.add_argument("--series", metavar="UID", default=None,
                        help="the SeriesInstanceUID to segment in a DICOM folder that holds several series")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write <stem>_seg.dcm, a DICOM Segmentation of the source series (DICOM input "
                             'only; needs pip install "attention-unet-segment[dicom]")')
    parser.add_argument("--keep-patient-info", action="store_true",
                        help="put the DICOM patient's name, ID, birth date and study date into the report (by "
                             "default only the DICOM SEG carries patient data)")
    parser.add_argument("--report-pdf", action="store_true",
                        help="also write <stem>_report.pdf: a one-page report with views of each structure, the "
                             "attention map, a volume table and the warnings (needs matplotlib)")


def _volumes_line(stem: str, paths: OutputPaths) -> str:
    report = read_json(paths.report, "segmentation report", AttentionUNetError)
    volumes = ", ".join(f"{s['name']} {s['volume_ml']:.3f} mL" for s in report["segments"])
    if report.get("sides"):
        volumes += "; " + ", ".join(f"{side} {total['volume_ml']:.3f} mL" for side, total in report["sides"].items())
        if report.get("asymmetry_index") is not None:
            volumes += f", asymmetry {report['asymmetry_index']:+.3f}"
    if report.get("warnings"):
        volumes += f" ({len(report['warnings'])} warning(s): see the warning lines above and the report)"
    return f"{stem}: {volumes} -> {paths.segmentation.parent}"


def _run_segment_command(args: argparse.Namespace, inputs: Sequence[str], output_dir: Path,
                         model: Optional[ModelBundle] = None, force: Optional[bool] = None) -> Dict[str, OutputPaths]:
    """Shared by ``segment`` and ``demo``: progress reporting, model resolution, the run and the final record
    (``model``/``force`` replace ``--model``/``--force`` when given)."""
    roi = parse_roi(getattr(args, "roi", None))
    kind = args.progress or default_progress_kind()
    reporter = make_progress(kind)
    try:
        written = segment_files(
            inputs, output_dir, model or args.model, device=args.device, overlap=getattr(args, "overlap", None),
            tta=getattr(args, "tta", False), batch_size=getattr(args, "batch_size", None),
            precision=getattr(args, "precision", "auto"),
            roi=roi, attention=not getattr(args, "no_attention", False),
            probabilities=getattr(args, "probabilities", False),
            largest_component=getattr(args, "largest_component", False), fmt=getattr(args, "format", "nii.gz"),
            force=args.force if force is None else force, localize=getattr(args, "localize", "auto"),
            progress=reporter, also_reads=_roi_files(getattr(args, "roi", None)),
            series=getattr(args, "series", None), dicom_seg=getattr(args, "dicom_seg", False),
            keep_patient_info=getattr(args, "keep_patient_info", False),
            # above a bar; not with --progress json (stdout: records, stderr: errors; the report holds them all)
            log=reporter.log,
            report_pdf=getattr(args, "report_pdf", False))
        failure = None
    except InputsFailedError as error:  # the others' results are listed, then the error line ends the run
        failure, written = error, error.written
    finally:
        reporter.close()
    summary = Path(output_dir) / SUMMARY_NAME if len(inputs) > 1 else None
    if kind == "json":
        record = {"stage": "done", "fraction": 1.0, "message": "Done",
                  "outputs": {stem: paths.to_dict() for stem, paths in written.items()}}
        if summary is not None:
            record["summary"] = str(summary.resolve())
        if failure is not None:
            record["failed"] = failure.failed
        reporter.emit(record)
    else:
        for stem, paths in written.items():
            print(_volumes_line(stem, paths))
        if summary is not None:
            print(f"summary: {summary}")
    if failure is not None:
        raise failure
    return written


def cmd_segment(args: argparse.Namespace) -> int:
    _run_segment_command(args, args.inputs, args.output_dir)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------- dicom-seg
def _configure_dicom_seg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", metavar="LABELS", help="label map on the series' grid (.nrrd, .nii.gz, ...)")
    parser.add_argument("--source", nargs="+", required=True, metavar="PATH",
                        help="the DICOM series: its folder, or its files (@FILE reads one argument per line)")
    parser.add_argument("--series", metavar="UID", default=None, help="the series to use in a folder of several")
    parser.add_argument("--segments", required=True, type=Path, metavar="JSON",
                        help='the segments: [{"value": 1, "name": "...", "color": [r, g, b], "terminology": '
                             '"<3D Slicer terminology string>"}, ...]')
    parser.add_argument("--algorithm", nargs=2, required=True, metavar=("NAME", "VERSION"),
                        help="the algorithm that made the labels (model name and version)")
    parser.add_argument("--output", required=True, type=Path, help="the DICOM SEG file to write (.dcm)")
    parser.add_argument("--progress", choices=PROGRESS_KINDS, default=None,
                        help="json: one object per line on stdout, ending with the 'done' record (default: none)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")


def cmd_dicom_seg(args: argparse.Namespace) -> int:
    """Write a DICOM SEG of an existing label map (the Slicer module's Export > DICOM SEG runs this)."""
    from ..inference.dicomseg import write_dicom_seg

    path = write_dicom_seg(args.labels, args.source, args.segments, args.output, tuple(args.algorithm),
                           series_uid=args.series, force=args.force)
    if args.progress == "json":
        make_progress("json").emit({"stage": "done", "fraction": 1.0, "message": "Done",
                                    "outputs": {"dicom_segmentation": str(path.resolve())}})
    else:
        print(f"wrote {path}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------------- models
def _dice_line(section: Any) -> str:
    dice = section.get("dice") if isinstance(section, dict) else None
    if not isinstance(dice, dict):
        return ""
    return ", ".join(f"{name} {value:.3f}" if isinstance(value, (int, float)) else f"{name} -"
                     for name, value in dice.items())


def _whole_head_line(section: Any) -> str:
    """``metrics.whole_head`` (``finalize_hippocampus.py --whole-head``): median per-side Dice, ours vs hippodeep,
    on the held-out heads and on all of them."""
    if not isinstance(section, dict):
        return ""
    parts = []
    for key, heads in (("median_dice_held_out", section.get("held_out_heads")), ("median_dice", section.get("heads"))):
        medians = section.get(key)
        if isinstance(medians, dict) and isinstance(medians.get("ours"), (int, float)) and isinstance(heads, list):
            which = f"the {len(heads)} held-out" if key == "median_dice_held_out" else f"all {len(heads)}"
            parts.append(f"median per side {medians['ours']:.3f} on {which} heads "
                         f"({', '.join(map(str, heads))}; hippodeep {medians.get('hippodeep', float('nan')):.3f})")
    return "; ".join(parts)


def model_card(bundle: ModelBundle) -> str:
    """A Markdown model card of ``bundle`` from its ``model.json``: what it segments, its networks, data, training
    and metrics, and a fold ensemble's cross-validation table."""
    from ..model.ensemble import cross_validation_table

    metadata = bundle.metadata
    metrics = metadata.get("metrics") if isinstance(metadata.get("metrics"), dict) else {}
    training = metrics.get("training") if isinstance(metrics.get("training"), dict) else {}
    rows = [("Segments", ", ".join(f"{label.value} {label.name}" for label in bundle.labels)),
            ("Networks", "1" if bundle.fold_count == 1 else f"{bundle.fold_count} folds (fold ensemble: every fold "
                                                            "runs on every window, softmax averaged)"),
            ("Training data", metadata.get("training_data") or ""), ("Licence", metadata.get("license") or ""),
            ("Training time", f"{training['seconds']} s" if "seconds" in training else ""),
            ("Hardware", training.get("hardware") or "; ".join(sorted({str(f.get("hardware")) for f in
                                                                      training.get("folds", [])}))),
            ("Validation Dice", _dice_line(metrics.get("validation"))),
            ("Cross-validation mean Dice", _dice_line((metrics.get("cross_validation") or {}).get("mean"))),
            ("Held-out Dice", _dice_line(metrics.get("held_out"))),
            ("Whole-head Dice", _whole_head_line(metrics.get("whole_head"))),
            ("Selection", metrics.get("selection") if isinstance(metrics.get("selection"), str) else "")]
    lines = [f"# {bundle.name} {bundle.version}", "", metadata.get("description") or "", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows if value]
    table = cross_validation_table(metrics)
    if table:
        lines += ["", "## Cross-validation", "", table]
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    registry = ModelRegistry()
    if args.card:
        print(model_card(registry.find(args.card)))
        return EXIT_OK
    bundles, problems = registry.scan()
    rows = [{"name": b.name, "version": b.version, "labels": [label.name for label in b.labels],
             "size_bytes": b.size_bytes, "sha256": b.sha256, "folds": b.fold_count, "description": b.description,
             "path": str(b.path), "status": "ok"} for b in bundles]
    broken = [{"name": path.name, "path": str(path), "status": "broken", "problem": reason}
              for path, reason in problems]
    if args.json:
        print(json.dumps(rows + broken, indent=2))
        return EXIT_OK
    if not rows:
        print("no models installed; searched " + ", ".join(str(p) for p in registry.search_path))
    else:
        table = [("name", "version", "labels", "folds", "size", "sha256", "path")] + [
            (r["name"], r["version"], ", ".join(r["labels"]), str(r["folds"]), f"{r['size_bytes'] / 2**20:.1f} MiB",
             r["sha256"][:12], r["path"]) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for entry in broken:
        print(f"broken: {entry['path']}: {entry['problem']}")
    return EXIT_OK


def cmd_devices(args: argparse.Namespace) -> int:
    """What ``--device auto`` would use: the CUDA GPUs torch sees (the Slicer module asks this in a separate
    process, so torch and a CUDA context never load into Slicer itself)."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            gpus.append({"name": properties.name, "memory_gb": round(properties.total_memory / 2**30, 1)})
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus, "auto": "cuda" if gpus else "cpu"}
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    print(f"torch {info['torch']}, CUDA {info['cuda'] or 'not in this build'}")
    for index, gpu in enumerate(gpus):
        print(f"cuda:{index}  {gpu['name']}  {gpu['memory_gb']} GB")
    print(f"--device auto uses: {info['auto']}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ summary / gradcheck
def _add_network_options(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    parser.add_argument("--channels", type=positive_int, nargs="+", metavar="C",
                        help="use an untrained network of these widths instead of a model, e.g. 64 128 256 512 "
                             "(the design tutorial's network)")
    parser.add_argument("--in-channels", type=positive_int, default=1)
    parser.add_argument("--out-channels", type=positive_int, default=2)
    parser.add_argument("--norm", choices=("instance", "batch"), default="instance")
    parser.add_argument("--deep-supervision", action="store_true")
    parser.add_argument("--input-size", type=positive_int, nargs=3, metavar=("X", "Y", "Z"),
                        help="input size in voxels, ITK (x, y, z) order (default: the model's patch size, or 64^3)")


def _network_and_size(args: argparse.Namespace):
    from ..model.network import AttentionUNet

    if args.channels:
        if len(args.channels) < 2:
            raise UsageError("--channels needs at least two levels, e.g. 16 32 64 128")
        model = AttentionUNet(args.in_channels, args.out_channels, args.channels, norm=args.norm,
                              deep_supervision=args.deep_supervision)
        size_xyz = tuple(args.input_size or (64, 64, 64))
    else:
        bundle = ModelRegistry().resolve(args.model)
        model = bundle.build_model("cpu", fold=0)  # every fold of an ensemble has this architecture
        size_xyz = tuple(args.input_size or bundle.patch_size)
    if min(size_xyz) < model.min_input_size:
        raise UsageError(f"--input-size {' '.join(map(str, size_xyz))} is too small: this network needs at least "
                         f"{model.min_input_size} voxels per axis")
    return model, size_xyz[::-1]


def cmd_summary(args: argparse.Namespace) -> int:
    from ..model.diagnostics import summarize

    model, size_zyx = _network_and_size(args)
    print(summarize(model, size_zyx).format_table())
    return EXIT_OK


def cmd_gradcheck(args: argparse.Namespace) -> int:
    import torch

    from ..model.diagnostics import check_gradient_flow

    model, size_zyx = _network_and_size(args)
    generator = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn((1, model.in_channels, *size_zyx), generator=generator)
    target = torch.randint(0, model.out_channels, (1, *size_zyx), generator=generator)
    report = check_gradient_flow(model, inputs, target)
    print(report.format())
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


# ---------------------------------------------------------------------------------------------------------- demo
def find_sample() -> Path:
    samples = sorted(SAMPLE_DATA_DIR.glob("*.nii.gz"))
    if not samples:
        raise InputImageError(f"no sample volume found in {SAMPLE_DATA_DIR}; reinstall the extension or run "
                              "`attention-unet segment YOUR_IMAGE --output-dir DIR` instead")
    return samples[0]


def _check_demo_folder(folder: Path, stem: str, force: bool) -> None:
    """The demo refreshes its own folder: it may hold nothing but what a demo run writes (``<stem>_seg.nii.gz``,
    ``_seg.seg.nrrd``, ``_attention_<k>.nii.gz``, ``_report.json``, ``_preview.png`` and this tool's temporary
    folders), or anything with ``force`` (then only the demo's own files are replaced)."""
    from ..fileio.atomic import TEMP_DIR_PREFIX

    if not folder.exists() or force:
        return
    if not folder.is_dir():
        raise OutputExistsError(f"--output-dir {folder} is a file, not a folder; choose another --output-dir")
    own = re.compile(re.escape(stem) + r"_(seg\.nii\.gz|seg\.seg\.nrrd|attention_[0-9]+\.nii\.gz|report\.json|"
                     r"preview\.png)")
    foreign = sorted(entry.name for entry in folder.iterdir()
                     if not entry.name.startswith(TEMP_DIR_PREFIX)
                     and not (own.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink()))
    if foreign:
        names = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise OutputExistsError(f"--output-dir {folder} holds files the demo did not write ({names}); the demo only "
                                "refreshes its own folder: choose another (or an empty) --output-dir, or pass "
                                "--force to replace just the demo's files there")


def cmd_demo(args: argparse.Namespace) -> int:
    """Segment the bundled sample into ``--output-dir`` and draw the preview; run again, it refreshes the
    folder's demo files (``_check_demo_folder``)."""
    from ..fileio.imageio import image_stem
    from ..inference.preview import write_preview
    from ..inference.report import require_matplotlib

    require_matplotlib()
    sample = find_sample()
    stem = image_stem(sample)
    _check_demo_folder(args.output_dir, stem, args.force)
    bundle = ModelRegistry().resolve(args.model)
    written = _run_segment_command(args, [str(sample)], args.output_dir, model=bundle, force=True)
    preview = args.output_dir / f"{stem}_preview.png"
    write_preview(sample, written[stem], preview, force=True)
    if (args.progress or default_progress_kind()) != "json":
        print(f"preview: {preview}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------- main
#: Commands provided by the training modules (issue 3): command -> module.
OPTIONAL_COMMANDS = {"train": ("train", "train a model on a labelled dataset"),
                     "evaluate": ("evaluate", "score a model against reference segmentations"),
                     "ensemble": ("ensemble", "combine the fold bundles of a cross-validation into one model")}


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The full parser. ``argv`` tells which command will run: ``train``/``evaluate`` import their (heavy) module
    only when they are the command, otherwise they are listed by name only."""
    parser = _ArgumentParser(prog="attention-unet",
                             description="3D Attention U-Net segmentation with attention maps (AttentionUNet engine).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    segment = commands.add_parser("segment", help="segment volumes and write labels, attention maps and a report")
    _configure_segment(segment)
    segment.set_defaults(handler=cmd_segment)

    dicom_seg = commands.add_parser("dicom-seg", fromfile_prefix_chars="@",
                                    help="write a DICOM Segmentation of a label map on a DICOM series' grid")
    _configure_dicom_seg(dicom_seg)
    dicom_seg.set_defaults(handler=cmd_dicom_seg)

    models = commands.add_parser("models", help="list installed models")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.add_argument("--card", metavar="MODEL", help="print the model card (Markdown) of one installed model "
                        "name or bundle folder, with a fold ensemble's cross-validation table")
    models.set_defaults(handler=cmd_models)

    devices = commands.add_parser("devices", help="show the GPUs torch sees and what --device auto uses")
    devices.add_argument("--json", action="store_true", help="machine-readable output")
    devices.set_defaults(handler=cmd_devices)

    summary = commands.add_parser("summary", help="layer-by-layer output shapes, parameters and FLOPs")
    _add_network_options(summary)
    summary.set_defaults(handler=cmd_summary)

    gradcheck = commands.add_parser("gradcheck", help="report parameters that get no or all-zero gradients")
    _add_network_options(gradcheck)
    gradcheck.add_argument("--seed", type=int, default=0)
    gradcheck.set_defaults(handler=cmd_gradcheck)

    demo = commands.add_parser("demo", help="segment the bundled sample with the default model and draw a preview")
    demo.add_argument("--output-dir", type=Path, default=Path("demo-output"))
    _add_model_options(demo)
    _add_run_options(demo)
    demo.set_defaults(handler=cmd_demo)

    requested = next((arg for arg in (argv or ()) if not arg.startswith("-")), None)
    for command, (name, summary_line) in OPTIONAL_COMMANDS.items():
        if importlib.util.find_spec(f"{__package__}.{name}") is None:
            continue
        sub = commands.add_parser(command, help=summary_line)
        if command == requested:
            module = importlib.import_module(f".{name}", __package__)
            module.configure_parser(sub)
            sub.set_defaults(handler=module.run_from_args)
    return parser


def _raise_cancelled(signum: int, _frame: Any) -> None:
    raise CancelledError(f"cancelled by signal {signal.Signals(signum).name}; no outputs of the unfinished input "
                         "were kept")


@contextlib.contextmanager
def _sigterm_cancels() -> Iterator[None]:
    """While running, SIGTERM (the Slicer module's Cancel) unwinds like an error, so every partial file is
    removed; the previous handler is restored afterwards (``main`` may run inside a larger program)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_cancelled)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 a check found problems, 2 an error the user can fix)."""
    args: Optional[argparse.Namespace] = None
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser(argv).parse_args(argv)
        with _sigterm_cancels():
            return int(args.handler(args))
    except KeyboardInterrupt:
        print("error: interrupted; no outputs of the unfinished input were kept", file=sys.stderr)
        return 130
    except (AttentionUNetError, OSError, MemoryError, RuntimeError) as error:
        message = error_message(error, args)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
