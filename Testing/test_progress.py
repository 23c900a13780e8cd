"""Progress reporters: JSON lines, the tqdm bar, sub-range scaling."""

from __future__ import annotations

import io
import json

import pytest

from AttentionUNetSegmentLib.progress import BarProgress, JsonProgress, NullProgress, make_progress, scaled


def test_json_progress_writes_one_object_per_line():
    stream = io.StringIO()
    reporter = make_progress("json", stream)
    reporter("load", 0.0, "Loading")
    reporter("infer", 1.7, "clamped")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records == [{"stage": "load", "fraction": 0.0, "message": "Loading"},
                       {"stage": "infer", "fraction": 1.0, "message": "clamped"}]


def test_bar_progress_shows_stage_and_percentage():
    stream = io.StringIO()
    reporter = make_progress("bar", stream)
    assert isinstance(reporter, BarProgress)
    reporter("infer", 0.5, "Sliding window")
    reporter.close()
    text = stream.getvalue()
    assert "Sliding window" in text and "50%" in text


def test_scaled_maps_a_sub_task_onto_its_share():
    stream = io.StringIO()
    second_of_two = scaled(JsonProgress(stream), 0.5, 1.0)
    second_of_two("infer", 0.5, "half of the second input")
    assert json.loads(stream.getvalue())["fraction"] == 0.75
    scaled(None, 0.0, 1.0)("infer", 0.5, "no reporter is fine")


def test_unknown_kind_is_refused():
    assert isinstance(make_progress("none"), NullProgress)
    with pytest.raises(ValueError, match="bar, json, none"):
        make_progress("xml")


def test_advance_and_log_reach_people_but_not_the_json_records():
    """Training's per-step state (advance) and epoch lines (log): a bar shows both, none writes the lines to its
    stream, json keeps stdout for milestone records only."""
    streams = {kind: io.StringIO() for kind in ("json", "none", "bar")}
    for kind, stream in streams.items():
        reporter = make_progress(kind, stream)
        reporter.advance("train", 0.25, "loss 0.5 dice 0.1")
        reporter("train", 0.5, "epoch 1: Dice 0.2")
        reporter.log("epoch 1: Dice 0.2")
        reporter.close()
    assert [json.loads(line) for line in streams["json"].getvalue().splitlines()] == [
        {"stage": "train", "fraction": 0.5, "message": "epoch 1: Dice 0.2"}]
    assert streams["none"].getvalue() == "epoch 1: Dice 0.2\n"
    bar = streams["bar"].getvalue()
    assert "loss 0.5 dice 0.1" in bar and "epoch 1: Dice 0.2\n" in bar and "50%" in bar


def test_a_bar_starts_where_its_first_report_is():
    """A resumed run's bar starts at the resumed share, so its rate (and ETA) counts only the new work."""
    stream = io.StringIO()
    reporter = make_progress("bar", stream)
    reporter.advance("train", 0.6, "resumed")
    assert reporter._bar.initial == reporter._bar.n == pytest.approx(60.0)
    reporter.advance("train", 0.7, "step")
    assert reporter._bar.n == pytest.approx(70.0)
    reporter.close()
