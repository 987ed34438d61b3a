"""Facts about the machine and installed packages, for run summaries and benchmark reports.

Read without importing torch, Keras or TensorFlow, so recording them costs nothing and
never pulls a second framework into a training process.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

#: Distribution names per reported package; the first one installed wins.
PACKAGE_DISTRIBUTIONS = {
    "keras": ("keras",),
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "jax": ("jax",),
    "numpy": ("numpy",),
    "scikit-learn": ("scikit-learn",),
    "pillow": ("pillow",),
    "panel": ("panel",),
}


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's 'model name' from /proc/cpuinfo (else platform.processor())."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def package_version(*distributions: str) -> str | None:
    """Installed version of the first of `distributions` found, None when none is."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def package_versions() -> dict[str, str]:
    """Python and the installed versions of the packages a run depends on (absent ones left out)."""
    versions = {"python": platform.python_version()}
    for package, distributions in PACKAGE_DISTRIBUTIONS.items():
        version = package_version(*distributions)
        if version is not None:
            versions[package] = version
    return versions


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None
