import importlib.metadata
import os
import subprocess
import sys

from keras_ham.machine import cpu_model, package_version, package_versions


def test_cpu_model_parsing():
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t: fpu\n"
    assert cpu_model(text) == "Intel(R) Xeon(R) Processor"
    assert cpu_model("processor : 0\n")  # falls back to platform information, never empty


def test_package_versions_are_installed_versions_without_imports():
    versions = package_versions()
    assert versions["keras"] == importlib.metadata.version("keras")
    assert versions["numpy"] == importlib.metadata.version("numpy")
    assert package_version("no-such-distribution-x", "keras") == versions["keras"]
    assert package_version("no-such-distribution-x") is None
    code = ("import sys\nfrom keras_ham.machine import package_versions\npackage_versions()\n"
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "[]"


def test_cpu_vector_extensions_read_the_flags_line():
    from keras_ham.machine import cpu_vector_extensions

    amd_without_avx512 = "processor : 0\nmodel name : AMD EPYC\nflags : fpu sse2 avx avx2 fma bmi2\n"
    xeon = "flags : fpu avx2 fma avx512f avx512dq avx512_vnni amx_tile\nflags : avx2\n"
    assert cpu_vector_extensions(amd_without_avx512) == ["avx2", "fma"]
    assert cpu_vector_extensions(xeon) == ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"]
    assert cpu_vector_extensions("model name : Apple M2\n") == []


def test_kernel_overrides_name_only_the_variables_set():
    from keras_ham.machine import kernel_overrides

    assert kernel_overrides({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "", "PATH": "/bin"}) == {
        "ATEN_CPU_CAPABILITY": "avx2"}
    assert kernel_overrides({}) == {}


def test_cpu_generation_tells_two_epyc_generations_apart():
    from keras_ham.machine import cpu_generation

    zen5 = "vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nstepping\t: 1\n"
    zen4 = zen5.replace("26", "25").replace(": 2\n", ": 17\n")
    assert cpu_generation(zen5) == "AuthenticAMD family 26 model 2 stepping 1"
    assert cpu_generation(zen4) == "AuthenticAMD family 25 model 17 stepping 1"
    assert cpu_generation("processor : 0\nmodel name : Apple M2\n") == ""
