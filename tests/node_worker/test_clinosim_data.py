"""Hospital generation: the progress bar and the cache stamp."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.services.node_worker.clinosim_data import (
    _run_with_progress,
    ensure_clinosim,
    estimate_seconds,
)


@pytest.mark.slow  # waits for the once-a-second redraw
def test_progress_shows_stage_elapsed_and_estimate() -> None:
    out = io.StringIO()
    cmd = [
        sys.executable,
        "-c",
        "import time; print('Simulating inpatient 5/10', flush=True); time.sleep(1.6)",
    ]
    _run_with_progress(cmd, label="h1", population=4000, stream=out)
    text = out.getvalue()
    assert "generating h1: clinosim population 4000" in text
    assert "Simulating inpatient 5/10" in text and "%" in text and "of ~" in text
    assert "done in" in text


@pytest.mark.slow  # the redraw loop notices the exit within a second
def test_progress_raises_when_clinosim_fails() -> None:
    with pytest.raises(subprocess.CalledProcessError):
        _run_with_progress(
            [sys.executable, "-c", "raise SystemExit(3)"],
            label="h",
            population=1,
            stream=io.StringIO(),
        )


def test_estimate_grows_with_population() -> None:
    assert estimate_seconds(4000) > estimate_seconds(400) > 0


def test_cached_output_is_reused_only_for_the_same_parameters(clinosim_source: Path) -> None:
    # the session fixture generated seed 11, population 20: asking again returns at once
    assert ensure_clinosim(clinosim_source, seed=11, population=20) == clinosim_source
    assert (clinosim_source / ".complete").read_text() == "seed=11 population=20\n"
