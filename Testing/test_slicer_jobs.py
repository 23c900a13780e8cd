"""The Slicer package's jobs (``AttentionUNetSlicer/jobs.py``) on real MRML: batch bookkeeping with an injected
engine-process factory (no child process: the engine's outputs are written as the engine writes them), a scene
closed during a batch, the device query through the engine-process client, Slicer's temporary folder."""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from slicer_module_shims import TEMPORARY_PATH, install_missing_modules, load_module  # noqa: E402

install_missing_modules()
from AttentionUNetSlicer import engineProcess, jobs  # noqa: E402
from AttentionUNetSlicer.engineProcess import Progress, RunResult  # noqa: E402
from test_slicer_logic import _add_volume, _node_ids, _oblique_image, _write_engine_outputs  # noqa: E402


class RecordedEngine:
    """An engine run that needs no child process: ``start()`` writes what the engine writes for the input (label
    map and report, ``_write_engine_outputs``) or ends the way the engine fails, as planned per run. Called as
    ``EngineProcess`` is, so it goes where the Logic's ``engineProcessFactory`` does."""

    def __init__(self, plan, env, command, env_vars=None, cwd=None, onProgress=None, onLog=None):
        self.plan, self.env, self.command = plan, env, list(command)
        self.onProgress, self.onLog = onProgress, onLog
        self.result = None
        self.progress = Progress("starting", 0.0, "", None)

    def start(self):
        outcome, volume = self.plan.pop(0)
        output = self.command[self.command.index("--output-dir") + 1]
        if outcome == "done":
            files, _, _, _ = _write_engine_outputs(self.env, volume, pathlib.Path(output), located=False)
            self.onProgress(Progress("done", 1.0, "Done", 0.0))
            self.result = RunResult(0, False, outputs={"input": files}, log=["[done] Done"])
        else:
            self.result = RunResult(2, False, error="the disk is full", log=["error: the disk is full"])
        return self

    def poll(self):
        return False

    def cancel(self):
        pass


@pytest.fixture()
def env(tiny_bundle):
    module = load_module()
    scene = slicer.mrmlScene
    plan = []
    environment = {"module": module, "scene": scene, "bundle": tiny_bundle, "plan": plan}
    logic = module.AttentionUNetSegmentLogic(
        engineProcessFactory=lambda command, env=None, cwd=None, onProgress=None, onLog=None: RecordedEngine(
            plan, environment, command, env, cwd, onProgress, onLog))
    logic.enginePython = sys.executable
    environment["logic"] = logic
    return environment


def _rows(table):
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [dict(zip(columns, (table.GetCellText(r, c) for c in range(len(columns)))))
            for r in range(table.GetNumberOfRows())]


def test_batch_bookkeeping_with_an_injected_engine_needs_no_child_process(env):
    scene, logic = env["scene"], env["logic"]
    first = _add_volume(scene, "First", _oblique_image(seed=1))
    second = _add_volume(scene, "Second", _oblique_image(seed=2))
    flat = _add_volume(scene, "Flat", np.zeros((1, 20, 20), np.float32))
    env["plan"] += [("done", first), ("fail", second)]
    options = jobs.SegmentationOptions(model=str(env["bundle"].path), device="cpu", attentionMaps=False)
    table = logic.processBatch([first, second, flat], options)
    rows = _rows(table)
    assert [(row["input"], row["status"]) for row in rows] == [("First", "done"), ("Second", "failed"),
                                                              ("Flat", "skipped")]
    assert rows[1]["error"] == "the disk is full" and "2D" in rows[2]["error"]
    assert float(rows[0]["Anterior (mL)"]) > 0
    assert env["plan"] == []  # the engine ran for the two volumes that could be segmented, the 2D one was refused


def test_closing_the_scene_during_a_batch_cancels_without_adding_a_table(env, tmp_path):
    """What the panel does on ``StartCloseEvent`` (``cancel(sceneClosing=True)``), run from a real observer of the
    real scene's close: the batch ends, nothing is added to the closing scene."""
    scene, logic = env["scene"], env["logic"]
    volumes = [_add_volume(scene, f"Case {i}", _oblique_image(seed=i)) for i in range(2)]
    logic.engineProcessFactory = jobs.EngineProcess  # a real, long engine run that the close must stop
    slow = tmp_path / "python"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    logic.enginePython = str(slow)
    job = logic.startBatch(volumes, jobs.SegmentationOptions(model=str(env["bundle"].path), device="cpu"))
    added = []

    def onStartClose(caller, event):
        before = _node_ids(scene)
        job.cancel(sceneClosing=True)
        added.extend(_node_ids(scene) - before)

    tag = scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, onStartClose)
    try:
        started = time.monotonic()
        scene.Clear(0)
        assert time.monotonic() - started < 1  # the cancel only tells the engine to stop
    finally:
        scene.RemoveObserver(tag)
    job.wait()  # what the panel's timer does with the runs it stopped
    assert time.monotonic() - started < 10
    assert job.done and job.cancelled and job.summaryTable is None and added == []
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0


def test_device_query_runs_in_the_engine_process_without_blocking(env, tmp_path, monkeypatch):
    """Expanding Advanced starts the query and returns at once; the poll timer collects the answer."""
    logic = env["logic"]
    logic.engineProcessFactory = jobs.EngineProcess
    slow = tmp_path / "python"
    slow.write_text('#!/bin/sh\nsleep 3\necho \'{"torch": "2", "cuda": "12.1", "gpus": [{"name": "H", '
                    '"memory_gb": 80.0}], "auto": "cuda"}\'\n')
    slow.chmod(0o755)
    logic.enginePython = str(slow)
    started = time.monotonic()
    query = logic.startDeviceQuery()
    assert time.monotonic() - started < 1.0 and query.poll() and not query.done
    assert query.wait().text == "GPU found: H (80 GB), CUDA 12.1. 'auto' uses it."
    monkeypatch.setattr(jobs, "DEVICE_QUERY_TIMEOUT_SECONDS", 0.5)
    assert logic.startDeviceQuery().wait().text.startswith("Could not ask the engine")  # hung: given up
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho 'error: no torch' >&2\nexit 2\n")
    failing.chmod(0o755)
    logic.enginePython = str(failing)
    assert logic.startDeviceQuery().wait().text.startswith("Could not ask the engine")


def _stubborn_python(tmp_path):
    """A stand-in for Slicer's Python that ignores SIGTERM (as its children do: ignored signals are inherited)."""
    path = tmp_path / "stubborn"
    path.write_text("#!/bin/sh\ntrap '' TERM\nsleep 30\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM handling is POSIX-specific")
def test_cancel_never_waits_on_the_gui_thread_for_the_engine_to_go(env, tmp_path, monkeypatch):
    """Apply's Cancel (and the device query giving up) only tells the engine to stop: an engine that ignores the
    request is killed by a later poll of the panel's timer after the grace period, and only then is the job done
    (cancelled, its temporary folder removed, nothing added to the scene)."""
    monkeypatch.setattr(engineProcess, "CANCEL_GRACE_SECONDS", 1.5)
    scene, logic = env["scene"], env["logic"]
    logic.engineProcessFactory = jobs.EngineProcess
    logic.enginePython = _stubborn_python(tmp_path)
    volume = _add_volume(scene, "Stubborn", _oblique_image())
    before = _node_ids(scene)
    job = logic.process(volume, options=jobs.SegmentationOptions(model=str(env["bundle"].path)),
                        waitForCompletion=False)
    time.sleep(0.2)  # the shell has set its trap
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 0.5 and job.poll() and not job.done
    job.wait()
    assert 1.5 <= time.monotonic() - started < 10
    assert job.done and job.cancelled and job.error is None and job._workDir is None
    assert _node_ids(scene) == before

    monkeypatch.setattr(jobs, "DEVICE_QUERY_TIMEOUT_SECONDS", 0.3)
    monkeypatch.setattr(jobs, "moduleAvailable", lambda name: True)
    query = logic.startDeviceQuery()
    time.sleep(0.4)  # past its deadline
    started = time.monotonic()
    assert query.poll() and time.monotonic() - started < 0.5  # given up: the engine is told to stop, not waited on
    assert query.wait().text.startswith("Could not ask the engine")


def test_engine_runs_work_in_slicers_temporary_folder(env, tmp_path):
    scene, logic = env["scene"], env["logic"]
    TEMPORARY_PATH[0] = str(tmp_path)
    seen = []

    def factory(command, env=None, cwd=None, onProgress=None, onLog=None):
        seen.append(cwd)
        engine = RecordedEngine([("fail", None)], {}, command)
        return engine

    logic.engineProcessFactory = factory
    try:
        volume = _add_volume(scene, "Case", _oblique_image())
        job = logic.process(volume, options=jobs.SegmentationOptions(model=str(env["bundle"].path)),
                            waitForCompletion=False).wait()
    finally:
        TEMPORARY_PATH[0] = None
    assert job.error == "the disk is full"
    (cwd,) = seen
    assert cwd.startswith(str(tmp_path)) and "AttentionUNet-segment-" in cwd
    assert not list(tmp_path.iterdir())  # removed when the run ended


def test_scene_import_and_export_run_on_recorded_engine_outputs(env, tmp_path):
    """The whole path after the engine, with no child process: the job imports what the engine wrote (segments
    from its .seg.nrrd, volumes from its report), and Export writes its files from the scene."""
    import csv

    scene, logic = env["scene"], env["logic"]
    volume = _add_volume(scene, "Recorded", _oblique_image(seed=4))
    env["plan"].append(("done", volume))
    result = logic.process(volume, options=jobs.SegmentationOptions(model=str(env["bundle"].path)))
    segments = result.segmentation.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(2)] == ["Anterior", "Posterior"]
    files = logic.exportForReport(result.segmentation, tmp_path / "export")
    with open(files["volumes"], newline="") as stream:
        counted = {int(row["value"]): int(row["voxels"]) for row in csv.DictReader(stream)}
    assert counted == {row["value"]: row["voxels"] for row in result.statistics}  # the engine's counts, as exported
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(pathlib.Path(f).name
                                                                            for f in files.values())
