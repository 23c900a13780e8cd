"""What `segment` (and `demo`) may write, checked up front: never over an input or a file an input's header names
(--force or not), only names the file system can hold, hidden temporaries cleaned after a kill, out-of-memory as
one error line with advice that fits the device, and a demo that refreshes its own folder (issue 10).

The process boundary matters for each headline case, so it runs the real CLI in a subprocess; variants of the same
rule call ``cli.main`` in-process (the same code path minus the interpreter start).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegmentLib import errors
from AttentionUNetSegmentLib.cli import commands as cli
from AttentionUNetSegmentLib.errors import AttentionUNetError
from AttentionUNetSegmentLib.fileio.atomic import (TEMP_DIR_PREFIX, atomic_output, remove_stale_temporaries,
                                                   temporary_path)
from AttentionUNetSegmentLib.fileio.imageio import files_read_for
from AttentionUNetSegmentLib.inference.batch import segment_files
from AttentionUNetSegmentLib.inference.outputs import check_output_name

SAMPLE = sorted(cli.SAMPLE_DATA_DIR.glob("*.nii.gz"))


def _volume(path: Path, size_zyx=(16, 20, 24), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.normal(0.0, 10.0, size_zyx).astype(np.float32)
    array[4:12, 5:15, 6:18] += 100.0
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def _cli(*args: str, preexec_fn=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=timeout, preexec_fn=preexec_fn)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def _in_process(capsys, *args: str):
    status = cli.main(list(args))
    return status, capsys.readouterr().err


# ------------------------------------------------------------------------------------ outputs never replace inputs
def test_an_output_named_like_another_input_is_refused_even_with_force(tiny_bundle, tmp_path):
    """The reported data loss: the first input's label map name is the second input (the user's manual label)."""
    case = _volume(tmp_path / "case.nii.gz")
    manual = _volume(tmp_path / "case_seg.nii.gz", seed=1)
    before = {path.name: path.read_bytes() for path in (case, manual)}
    result = _cli("segment", str(case), str(manual), "--output-dir", str(tmp_path), "--force", "--model",
                  str(tiny_bundle.path), "--device", "cpu")
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert "case_seg.nii.gz" in line and "--force or not" in line
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before  # nothing written at all


def _symlink(tmp_path, case):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "case_seg.nii.gz").symlink_to(case)


def _hard_link(tmp_path, case):
    (tmp_path / "out").mkdir()
    os.link(case, tmp_path / "out" / "case_report.json")


def _linked_folder(tmp_path, case):
    (tmp_path / "out").symlink_to(tmp_path, target_is_directory=True)
    return [_volume(tmp_path / "case_attention_0.nii.gz", seed=2)]  # an input out/case_attention_0 resolves to


@pytest.mark.parametrize("link", [_symlink, _hard_link, _linked_folder])
def test_an_output_that_resolves_to_a_file_of_the_run_is_refused(tiny_bundle, tmp_path, capsys, link):
    case = _volume(tmp_path / "case.nii.gz")
    more_inputs = [str(path) for path in link(tmp_path, case) or []]
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    status, err = _in_process(capsys, "segment", str(case), *more_inputs, "--output-dir", str(tmp_path / "out"),
                              "--force", "--model", str(tiny_bundle.path), "--device", "cpu")
    assert status == 2 and "would overwrite" in _one_error_line(err)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def _raw(path: Path, size: int = 16 * 20 * 24) -> None:
    (np.random.default_rng(0).normal(100, 10, size)).astype(np.float32).tofile(path)


@pytest.mark.parametrize("header", ["mhd", "mhd-list", "nhdr", "nrrd"])
def test_an_output_over_the_data_file_an_input_header_names_is_refused(tiny_bundle, tmp_path, capsys, header):
    """A MetaImage or detached NRRD header reads another file; an output may not be that file either."""
    data = tmp_path / "scan_report.json"  # the name <stem>_report.json of the header's own report
    _raw(data)
    if header in ("nhdr", "nrrd"):  # a .nrrd may name a detached data file too
        path = tmp_path / f"scan.{header}"
        path.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 24 20 16\nencoding: raw\nendian: little\n"
                        f"data file: {data.name}\n")
    else:
        path = tmp_path / "scan.mhd"
        element = data.name
        if header == "mhd-list":  # one 2D slice per listed file; the report's name is one of the 16
            names = [data.name] + [f"slice{k}.raw" for k in range(1, 16)]
            for name in names:
                _raw(tmp_path / name, 24 * 20)
            element = "LIST 2D\n" + "\n".join(names)
        path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 24 20 16\nElementType = MET_FLOAT\n"
                        f"ElementDataFile = {element}\n")
    assert data in files_read_for(path)
    before = data.read_bytes()
    status, err = _in_process(capsys, "segment", str(path), "--output-dir", str(tmp_path), "--force", "--model",
                              str(tiny_bundle.path), "--device", "cpu")
    assert status == 2 and "would overwrite the data file" in _one_error_line(err)
    assert data.read_bytes() == before and not list(tmp_path.glob("scan_seg*"))


def test_the_roi_file_and_the_python_api_are_protected_too(tiny_bundle, tmp_path, capsys):
    case = _volume(tmp_path / "case.nii.gz")
    roi = tmp_path / "case_report.json"
    roi.write_text(json.dumps({"markups": [{"type": "ROI", "coordinateSystem": "LPS", "center": [0, 0, 0],
                                            "size": [50, 50, 50]}]}))
    before = roi.read_bytes()
    status, err = _in_process(capsys, "segment", str(case), "--output-dir", str(tmp_path), "--force", "--roi",
                              str(roi), "--model", str(tiny_bundle.path), "--device", "cpu")
    assert status == 2 and "would overwrite the input" in _one_error_line(err) and roi.read_bytes() == before
    manual = _volume(tmp_path / "case_seg.nii.gz", seed=1)
    with pytest.raises(AttentionUNetError, match="would overwrite"):
        segment_files([str(case), str(manual)], tmp_path, tiny_bundle, device="cpu", force=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["case.nii.gz", "case_report.json", "case_seg.nii.gz"]


def test_inputs_whose_stems_differ_only_in_case_are_refused(tiny_bundle, tmp_path, capsys):
    """On a case-insensitive disk (macOS, Windows) Case_seg.nii.gz and case_seg.nii.gz are one file."""
    (tmp_path / "a").mkdir()
    inputs = [str(_volume(tmp_path / "case.nii.gz")), str(_volume(tmp_path / "a" / "Case.nrrd"))]
    status, err = _in_process(capsys, "segment", *inputs, "--output-dir", str(tmp_path / "out"), "--model",
                              str(tiny_bundle.path), "--device", "cpu")
    assert status == 2 and "ignoring case" in _one_error_line(err) and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- output names checked up front
def test_a_name_too_long_for_the_file_system_is_refused_before_inference(tiny_bundle, tmp_path):
    stem = "s" * 240  # the input's name fits; <stem>_attention_0.nii.gz (259 bytes) does not
    case = _volume(tmp_path / f"{stem}.nii.gz")
    result = _cli("segment", str(case), "--output-dir", str(tmp_path / "out"), "--model", str(tiny_bundle.path),
                  "--device", "cpu", "--progress", "json")
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert "bytes long" in line and "allows in one name" in line and "free space" not in line
    assert '"inference"' not in result.stdout and not (tmp_path / "out").exists()


def test_a_path_too_long_and_a_name_not_utf8_are_refused(tiny_bundle, tmp_path, capsys):
    case = _volume(tmp_path / "case.nii.gz")
    deep = tmp_path.joinpath(*["d" * 200] * 21)  # about 4.2 kB, beyond PATH_MAX
    status, err = _in_process(capsys, "segment", str(case), "--output-dir", str(deep), "--model",
                              str(tiny_bundle.path), "--device", "cpu")
    assert status == 2 and "choose a shorter --output-dir" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == [case]
    with pytest.raises(AttentionUNetError, match="not valid UTF-8"):
        check_output_name(tmp_path / "caf\udce9_seg.nii.gz")  # how Python spells an undecodable byte


# ---------------------------------------------------------------------------------------------- temporary files
def test_temporaries_are_hidden_and_only_this_tools_stale_ones_are_removed(tmp_path):
    target = tmp_path / "case_seg.nii.gz"
    with atomic_output(target) as partial:
        assert partial == temporary_path(target) and partial.name == target.name
        assert partial.parent.parent == tmp_path and partial.parent.name.startswith(TEMP_DIR_PREFIX)
        partial.write_bytes(b"x")
        assert list(tmp_path.glob("*.nii.gz")) == []  # hidden in a dot-folder: no glob of the outputs sees it
    assert [path.name for path in tmp_path.iterdir()] == ["case_seg.nii.gz"]

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        own_name = temporary_path(target).parent.name
        host = own_name[len(TEMP_DIR_PREFIX):].rsplit("-", 1)[0]
        dead = tmp_path / f"{TEMP_DIR_PREFIX}{host}-{gone.pid}"
        alive = tmp_path / f"{TEMP_DIR_PREFIX}{host}-{living.pid}"
        elsewhere = tmp_path / f"{TEMP_DIR_PREFIX}00000000-{gone.pid}"  # another host: its pids mean nothing here
        old = tmp_path / f"{TEMP_DIR_PREFIX}00000000-1"
        lookalike = tmp_path / f"{TEMP_DIR_PREFIX}{host}-{gone.pid}.nii.gz"  # a file, not this tool's folder
        legacy = tmp_path / f"case_seg.partial-{gone.pid}.nii.gz"  # could be anyone's file: left alone
        for folder in (dead, alive, elsewhere, old):
            folder.mkdir()
            (folder / "case_seg.nii.gz").write_bytes(b"partial")
        lookalike.write_bytes(b"user")
        legacy.write_bytes(b"user")
        os.utime(old, (time.time() - 3 * 86400,) * 2)
        remove_stale_temporaries(tmp_path)
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
            ["case_seg.nii.gz", alive.name, elsewhere.name, lookalike.name, legacy.name])
    finally:
        living.kill()
        living.wait()


def test_a_run_killed_while_writing_leaves_no_visible_partial_and_the_rerun_cleans_up(tiny_bundle, tmp_path):
    image = tmp_path / "big.nii"  # large outputs (probabilities on the whole grid), inference only in a small ROI
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 10, (160, 256, 256))
                                           .astype(np.int16)), str(image))
    out = tmp_path / "out"
    options = ["segment", str(image), "--output-dir", str(out), "--model", str(tiny_bundle.path), "--device", "cpu",
               "--probabilities", "--roi", "-10", "10", "-10", "10", "-10", "10"]
    command = [sys.executable, "-m", "AttentionUNetSegmentLib", *options, "--progress", "json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in process.stdout:
            if json.loads(line)["stage"] == "write":
                break
        deadline = time.monotonic() + 60
        while not any(path.is_file() for path in out.glob(f"{TEMP_DIR_PREFIX}*/*")):
            assert time.monotonic() < deadline and process.poll() is None, "the run ended before writing"
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.stdout.close()
    visible = [path.name for path in out.iterdir() if not path.name.startswith(".")]
    assert visible == [], visible  # nothing half-written under an output's name or extension
    assert [path.name for path in out.glob("*.nii.gz")] == []
    assert len(list(out.glob(f"{TEMP_DIR_PREFIX}*"))) == 1

    result = _cli(*options)  # no --force needed: the killed run left no output under its final name
    assert result.returncode == 0, result.stderr
    assert [path.name for path in out.iterdir() if path.name.startswith(".")] == []
    assert (out / "big_seg.nii.gz").is_file()


# ------------------------------------------------------------------------------------------------ out of memory
def _virtual_memory_after_import() -> int:
    """Bytes of address space a CLI process holds once torch and the engine are imported."""
    code = ("import torch, AttentionUNetSegmentLib.cli.commands, AttentionUNetSegmentLib.inference.predictor\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmPeak')).split()[1])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    return int(result.stdout) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc to size the limit")
def test_running_out_of_ram_is_one_error_line_with_cpu_advice(tiny_bundle, tmp_path):
    """Under an address-space limit torch's CPU allocator really fails: a batch of all 343 windows of a 120^3
    volume needs over a GB of activations, the limit leaves half a GB beyond what the imports hold."""
    case = _volume(tmp_path / "case.nii.gz", size_zyx=(120, 120, 120))
    limit = _virtual_memory_after_import() + 2**29

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = _cli("segment", str(case), "--output-dir", str(tmp_path / "out"), "--model", str(tiny_bundle.path),
                  "--device", "cpu", "--batch-size", "4096", "--no-attention", preexec_fn=limit_memory)
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert line.startswith("error: out of memory (RAM)") and "GiB failed" in line, line
    assert "--batch-size" in line and "--device cpu" not in line
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_out_of_memory_advice_fits_the_command_and_the_device():
    try:
        np.empty(2**62, dtype=np.uint8)
    except MemoryError as error:
        ram = error
    args = cli.build_parser(["segment"]).parse_args(["segment", "x.nii.gz", "--output-dir", "o", "--device", "cpu"])
    message = errors.out_of_memory_message(ram, errors.memory_error_kind(ram), args)
    assert message.startswith("out of memory (RAM)") and "--roi" in message
    assert "--device cpu" not in message and "--batch-size" not in message  # the CPU default is one window already
    gpu = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert errors.memory_error_kind(gpu) == "gpu" and "--device cpu" in errors.out_of_memory_message(gpu, "gpu", args)
    assert errors.memory_error_kind(RuntimeError("shape mismatch")) is None


# --------------------------------------------------------------------------------------------------------- demo
@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE, reason="no bundled sample")
def test_demo_runs_twice_and_refreshes_only_its_own_folder(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo-output"
    for _ in range(2):  # README quick-start command 1, run again
        result = _cli("demo", "--output-dir", str(out), "--device", "cpu", "--progress", "none")
        assert result.returncode == 0, result.stderr
    names = sorted(path.name for path in out.iterdir())
    assert len(names) == 7 and all(name.startswith("MNI152_hippocampus_left_T1_") for name in names), names

    mine = out / "notes.txt"
    mine.write_text("mine")
    status = cli.main(["demo", "--output-dir", str(out), "--device", "cpu", "--progress", "none"])
    assert status == 2 and mine.read_text() == "mine" and sorted(p.name for p in out.iterdir()) == sorted(
        names + ["notes.txt"])
