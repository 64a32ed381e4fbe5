"""Generates a hospital's synthetic records once with clinosim (offline, deterministic by seed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def ensure_clinosim(out_dir: Path, *, seed: int, population: int) -> Path:
    """Generate clinosim output into `out_dir` unless already there; returns `out_dir`.

    Layout: `cif/narratives/template/documents/*/*.json` (notes, key `narrative`),
    `cif/structural/patients/...` and `fhir_r4/...` (structured records).
    """
    marker = out_dir / ".complete"
    if marker.exists():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("clinosim") or str(Path(sys.executable).with_name("clinosim"))
    subprocess.run(
        [exe, "simulate", "--country", "US", "--population", str(population),
         "--seed", str(seed), "--output", str(tmp), "--format", "fhir-r4"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    marker.write_text(f"seed={seed} population={population}\n")
    return out_dir
