"""The machine line every bench script records: CPU model, best vector ISA, core count."""
import os
import platform


def describe():
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.machine()
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    isa = "AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else "no AVX2"
    return f"{name}; {isa}; {os.cpu_count()} cores"
