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


def _cpuinfo_value(field: str, cpuinfo: str | None = None) -> str:
    """The first non-empty value of `field` in /proc/cpuinfo (or the text given); "" when
    absent or unreadable (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field and value.strip():
            return value.strip()
    return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's 'model name' from /proc/cpuinfo (else platform.processor())."""
    return _cpuinfo_value("model name", cpuinfo) or platform.processor() or platform.machine() or "unknown"


def cpu_generation(cpuinfo: str | None = None) -> str:
    """'<vendor> family F model M stepping S' from /proc/cpuinfo; "" when not reported.

    Clouds may report every AMD EPYC as 'AMD EPYC': the family tells the generations apart (25:
    Zen 3/4, 26: Zen 5). Two such 2-core VMs trained the benchmark's ResNet50 (torchvision, 128
    px, batch 32) at 15-16 and at 33-35 images/s."""
    vendor, family, model, stepping = (_cpuinfo_value(field, cpuinfo)
                                       for field in ("vendor_id", "cpu family", "model", "stepping"))
    if not family:
        return ""
    return " ".join(part for part in (vendor, f"family {family}", model and f"model {model}",
                                      stepping and f"stepping {stepping}") if part)


#: /proc/cpuinfo flags that choose which floating-point kernels torch, oneDNN and TensorFlow
#: run (so two machines with the same seed train slightly different models).
VECTOR_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")

#: Environment variables that make torch / oneDNN use an older instruction set than the CPU has.
KERNEL_OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_vector_extensions(cpuinfo: str | None = None) -> list[str]:
    """The VECTOR_EXTENSIONS the CPU reports (first 'flags' line of /proc/cpuinfo); empty when
    unreadable (not Linux)."""
    flags = set(_cpuinfo_value("flags", cpuinfo).split())
    return [name for name in VECTOR_EXTENSIONS if name in flags]


def kernel_overrides(environ=None) -> dict[str, str]:
    """The KERNEL_OVERRIDES set in the environment (a run with them is not the CPU's own speed)."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in KERNEL_OVERRIDES if environ.get(name)}


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
