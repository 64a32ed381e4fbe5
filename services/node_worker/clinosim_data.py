"""Generates a hospital's synthetic records once with clinosim (offline, deterministic by seed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

#: Measured on a 2-core CPU (see docs/utility.md): clinosim takes about this many seconds per
#: person of catchment population, plus a fixed start-up; used only for the progress estimate.
SECONDS_PER_PERSON = 0.17
STARTUP_S = 10.0


def estimate_seconds(population: int) -> float:
    """Rough generation time for a catchment ``population`` on this project's 2-core machines."""
    return STARTUP_S + SECONDS_PER_PERSON * population


def ensure_clinosim(
    out_dir: Path,
    *,
    seed: int,
    population: int,
    progress: bool = False,
    stream: TextIO | None = None,
) -> Path:
    """Generate clinosim output into `out_dir` unless it is there with the same seed and
    population (a different population regenerates it); returns `out_dir`.

    Layout: `cif/narratives/template/documents/*/*.json` (notes, key `narrative`),
    `cif/structural/patients/...` and `fhir_r4/...` (structured records). With ``progress``,
    a bar with the elapsed time, an estimate and clinosim's current stage goes to ``stream``
    (stderr by default) while it runs.
    """
    marker = out_dir / ".complete"
    stamp = f"seed={seed} population={population}\n"
    if marker.exists() and marker.read_text() == stamp:
        return out_dir  # generated before with the same parameters
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("clinosim") or str(Path(sys.executable).with_name("clinosim"))
    cmd = [
        exe,
        "simulate",
        "--country",
        "US",
        "--population",
        str(population),
        "--seed",
        str(seed),
        "--output",
        str(tmp),
        "--format",
        "fhir-r4",
    ]
    if progress:
        _run_with_progress(
            cmd, label=out_dir.parent.name, population=population, stream=stream or sys.stderr
        )
    else:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    marker.write_text(stamp)
    return out_dir


def _run_with_progress(cmd: list[str], *, label: str, population: int, stream: TextIO) -> None:
    """Run clinosim, redrawing ``[####....] 42 % 1m10s of ~2m50s (stage)`` every second."""
    est = estimate_seconds(population)
    stage = ["starting"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                stage[0] = line.strip()[:60]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t0 = time.monotonic()
    print(
        f"generating {label}: clinosim population {population}, estimated "
        f"{_mmss(est)} (once; cached afterwards)",
        file=stream,
        flush=True,
    )
    while proc.poll() is None:
        time.sleep(1.0)
        el = time.monotonic() - t0
        frac = min(el / est, 0.99)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        print(
            f"\r  [{bar}] {100 * frac:3.0f} % {_mmss(el)} of ~{_mmss(max(est, el))} "
            f"({stage[0]})\x1b[K",
            end="",
            file=stream,
            flush=True,
        )
    reader.join(timeout=5)
    print(f"\r  done in {_mmss(time.monotonic() - t0)}\x1b[K", file=stream, flush=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, output=stage[0])


def _mmss(s: float) -> str:
    return f"{int(s) // 60}m{int(s) % 60:02d}s"
