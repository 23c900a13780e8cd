"""The Slicer side's engine-process client (``AttentionUNetSlicer.engineProcess``) against real child processes."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from AttentionUNetSlicer.engineProcess import (
    EngineProcess,
    EtaEstimator,
    buildSegmentCommand,
    describeFailure,
    formatDuration,
)

#: The module folder Slicer puts on sys.path (pytest does too: pyproject's ``pythonpath``).
MODULE_DIR = Path(__file__).resolve().parents[1] / "AttentionUNetSegment"


def _script(tmp_path, body: str) -> list:
    """A command running ``body`` as a Python script (a stand-in engine with a scripted behaviour)."""
    path = tmp_path / "fake_engine.py"
    path.write_text("import json, sys, time\n" + textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_progress_lines_are_parsed_and_outputs_collected(tmp_path):
    command = _script(tmp_path, """
        for i in range(5):
            print(json.dumps({"stage": "inference", "fraction": i / 5, "message": f"window {i}"}))
        print("a plain log line")
        print("warning on stderr", file=sys.stderr)
        print(json.dumps({"stage": "done", "fraction": 1.0, "outputs": {"case": {"labels": "x_seg.nrrd"}}}))
    """)
    progress, log = [], []
    run = EngineProcess(command, onProgress=progress.append, onLog=log.append).start()
    result = run.wait(timeout=30)
    assert result.ok and result.returncode == 0 and not result.cancelled
    assert result.outputs == {"case": {"labels": "x_seg.nrrd"}}
    assert [p.fraction for p in progress] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert progress[-1].stage == "done" and progress[-1].etaSeconds == 0.0
    assert "a plain log line" in log and "warning on stderr" in log
    assert "[inference] window 3" in log


def test_engine_error_line_becomes_the_message(tmp_path):
    command = _script(tmp_path, """
        print(json.dumps({"stage": "loading", "fraction": 0.0, "message": "reading"}))
        print("error: input.nii.gz is 2D (1 slice); segment a 3D volume", file=sys.stderr)
        sys.exit(2)
    """)
    result = EngineProcess(command).start().wait(timeout=30)
    assert not result.ok and result.returncode == 2
    assert result.error == "input.nii.gz is 2D (1 slice); segment a 3D volume"


def test_crash_without_done_is_reported_with_context(tmp_path):
    command = _script(tmp_path, """
        print("Traceback (most recent call last):", file=sys.stderr)
        print("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
        sys.exit(1)
    """)
    result = EngineProcess(command).start().wait(timeout=30)
    assert not result.ok
    assert "ran out of memory" in result.error and "CPU device" in result.error
    assert "Tried to allocate" in result.error  # the engine's last lines are quoted


def test_exit_zero_without_done_is_a_failure(tmp_path):
    result = EngineProcess(_script(tmp_path, "print('bye')\n")).start().wait(timeout=30)
    assert not result.ok and "without reporting its outputs" in result.error


def test_missing_package_is_actionable():
    message = describeFailure(1, ["ModuleNotFoundError: No module named 'safetensors'"])
    assert "safetensors" in message and "pip_install" in message


def test_cancel_stops_a_busy_engine_promptly(tmp_path):
    marker = tmp_path / "finished.txt"
    command = _script(tmp_path, f"""
        print(json.dumps({{"stage": "inference", "fraction": 0.1, "message": "busy"}}), flush=True)
        time.sleep(60)
        open({str(marker)!r}, "w").write("should never happen")
    """)
    result, seconds = _cancel_during_inference(command)
    assert seconds < 5
    assert result.cancelled and not result.ok and result.error is None
    assert not marker.exists()


def _cancel_during_inference(command: list):
    """Start ``command``, cancel it once it reports the inference stage; ``(result, seconds the cancel took)``."""
    run = EngineProcess(command).start()
    deadline = time.monotonic() + 30
    while run.progress.stage != "inference" and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    started = time.monotonic()
    run.cancel()
    result = run.wait(timeout=10)
    return result, time.monotonic() - started


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs a POSIX shell and /proc")
def test_cancel_stops_the_engine_behind_a_launcher(tmp_path):
    """Slicer runs the engine through its PythonSlicer launcher, which starts Python as a child: Cancel must end
    that child too (it holds the output pipes), not only the launcher."""
    pid_file = tmp_path / "engine.pid"
    engine = _script(tmp_path, f"""
        import os
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        print(json.dumps({{"stage": "inference", "fraction": 0.1, "message": "busy"}}), flush=True)
        time.sleep(60)
    """)
    launcher = ["/bin/sh", "-c", '"$@"; echo launcher-exit', "launcher", *engine]  # a child, not an exec
    result, seconds = _cancel_during_inference(launcher)
    assert seconds < 5 and result.cancelled
    assert not _alive(int(pid_file.read_text()))


@pytest.mark.skipif(not hasattr(os, "setsid"), reason="POSIX sessions")
def test_cancel_does_not_wait_for_a_grandchild_that_escaped_the_process_group(tmp_path, monkeypatch):
    """A grandchild in its own session survives the group signal and keeps the output pipes open: the run must
    still end once the engine itself has gone (after the grace period), not hang the GUI."""
    import AttentionUNetSlicer.engineProcess as runner

    monkeypatch.setattr(runner, "CANCEL_GRACE_SECONDS", 0.5)
    pid_file = tmp_path / "grandchild.pid"
    command = _script(tmp_path, f"""
        import os, subprocess
        child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print(json.dumps({{"stage": "inference", "fraction": 0.1, "message": "busy"}}), flush=True)
        time.sleep(60)
    """)
    try:
        result, seconds = _cancel_during_inference(command)
        assert result.cancelled and seconds < 5
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its new parent to reap it has ended)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM handling is POSIX-specific")
def test_cancel_kills_an_engine_that_ignores_sigterm(tmp_path, monkeypatch):
    import AttentionUNetSlicer.engineProcess as runner

    monkeypatch.setattr(runner, "CANCEL_GRACE_SECONDS", 0.5)
    command = _script(tmp_path, """
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"stage": "inference", "fraction": 0.1, "message": "stubborn"}), flush=True)
        time.sleep(60)
    """)
    run = EngineProcess(command).start()
    while run.progress.stage != "inference":
        run.poll()
        time.sleep(0.02)
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started < 0.2 and run.poll()  # told to stop, not waited on: a later poll kills it
    result = run.wait(timeout=10)
    assert result.cancelled and result.returncode is not None and result.returncode < 0


def test_eta_extrapolates_the_progress_rate():
    now = [0.0]
    eta = EtaEstimator(clock=lambda: now[0])
    assert eta.update(0.0) is None
    now[0] = 1.0
    assert eta.update(0.5) is None  # too early to trust
    now[0] = 10.0
    assert eta.update(0.5) == pytest.approx(10.0)
    now[0] = 15.0
    assert eta.update(0.75) == pytest.approx(5.0)
    assert eta.update(1.0) == 0.0


def test_formatDuration():
    assert formatDuration(None) == ""
    assert formatDuration(4.4) == "4 s"
    assert formatDuration(185) == "3 min 05 s"
    assert formatDuration(3720) == "1 h 02 min"


def test_buildSegmentCommand_follows_the_cli_contract():
    command = buildSegmentCommand(["a.nrrd"], "/out", python="PythonSlicer", model="tiny", device="cpu",
                                    overlap=0.25, tta=True, roi=(1, 2, 3, 4, 5, 6), attention=False,
                                    probabilities=True, largestComponent=True)
    assert command[:5] == ["PythonSlicer", "-m", "AttentionUNetSegmentLib", "segment", "a.nrrd"]
    text = " ".join(command)
    for part in ("--output-dir /out", "--device cpu", "--format nrrd", "--progress json", "--model tiny",
                 "--overlap 0.25", "--tta", "--roi 1 2 3 4 5 6", "--no-attention", "--probabilities",
                 "--largest-component"):
        assert part in text
    assert "--force" not in command
    assert "--localize" not in command  # not asked for: the engine's default (and engines without the option work)
    for mode in ("auto", "off"):
        localized = buildSegmentCommand(["a.nrrd"], "/out", localize=mode)
        assert localized[localized.index("--localize") + 1] == mode
    with pytest.raises(ValueError, match="localize"):
        buildSegmentCommand(["a.nrrd"], "/out", localize="on")
    with pytest.raises(ValueError):
        buildSegmentCommand(["a.nrrd"], "/out", roi=(1, 2, 3))
    with pytest.raises(ValueError):
        buildSegmentCommand([], "/out")


def test_progress_json_line_parsing_ignores_other_json(tmp_path):
    command = _script(tmp_path, """
        print(json.dumps({"not": "progress"}))
        print("{broken json")
        print(json.dumps({"stage": "done", "fraction": 1.0, "outputs": {}}))
    """)
    log = []
    result = EngineProcess(command, onLog=log.append).start().wait(timeout=30)
    assert result.ok
    assert json.dumps({"not": "progress"}) in log and "{broken json" in log


def test_the_client_imports_no_slicer_qt_or_vtk_and_nothing_heavy():
    """It runs in Slicer's main thread but must stay testable (and importable) as plain Python."""
    import subprocess

    code = (f"import sys, json; sys.path.insert(0, {str(MODULE_DIR)!r}); import AttentionUNetSlicer.engineProcess; "
            "print(json.dumps(sorted("
            "{m.split('.')[0] for m in sys.modules} & {'slicer', 'qt', 'ctk', 'vtk', 'torch', 'SimpleITK'})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == []


def test_devices_command_is_the_engines_json_query():
    from AttentionUNetSlicer.engineProcess import buildDevicesCommand

    assert buildDevicesCommand("/x/PythonSlicer") == ["/x/PythonSlicer", "-m", "AttentionUNetSegmentLib", "devices",
                                                        "--json"]
