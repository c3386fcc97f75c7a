"""Builds the C kernels at set-up, one extension per instruction set (cffi, API mode).

Why cffi: the structs and functions Python shares with C are declared once, in kernels.h, and cffi
compiles its bindings against that same header, so Python and C cannot disagree on a layout (the
ctypes mirrors of these structs were written twice by hand). Its calls release the GIL, as
ctypes' did, and cost less. Why several builds: one -march=native build faults on a CPU of the
same family without its instructions; ops.py picks the best build this CPU runs, at load.

setup.py lists `builders()`; `python service/kernels/build.py sanitized` builds the kernels with
AddressSanitizer and UndefinedBehaviorSanitizer into this folder, for `make sanitize`.
Set TOKENWIRE_KERNELS_NATIVE=1 at set-up to add a -march=native build, named after the CPU it is
built on (`_native_<cpu key>`), so ops.py never even imports it on another CPU.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ("thread_pool.c", "alloc.c", "cpu.c", "block_matmul.c", "block_matmul_int8.c",
           "decode_attention.c", "decoder_step.c")  # fmt: skip
# -Wno-psabi: the 16-float vector types change the calling convention below AVX-512, which only
# matters across objects built with other flags; every call between them stays inside one build.
COMMON = ["-O3", "-ffp-contract=fast", "-pthread", "-std=gnu11", "-Wno-psabi"]
# name -> (level from cpu.c's kernels_cpu_level, compiler flags); ops.py takes the first that runs.
X86_BUILDS = {
    "avx512_vnni": (3, ["-march=x86-64-v4", "-mavx512vnni"]),
    "avx512": (2, ["-march=x86-64-v4"]),
    "avx2": (1, ["-march=x86-64-v3"]),
    "portable": (0, ["-march=x86-64"]),
}
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def cdef_text() -> str:
    """kernels.h as cffi's parser takes it: without the preprocessor lines."""
    text = (HERE / "kernels.h").read_text()
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def cpu_key() -> str:
    """The CPU a -march=native build is for, in its name (ops.py looks for this CPU's): its flags, hashed."""
    try:
        found = re.search(r"^(?:flags|Features)\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        flags = found.group(1).split() if found else []
    except OSError:
        flags = []
    return hashlib.sha256(" ".join(sorted(flags) or [platform.processor()]).encode()).hexdigest()[:16]


def builder(name: str, flags: list[str], link: tuple[str, ...] = (), *, absolute: bool = False) -> FFI:
    """One build's FFI. Its paths are relative to setup.py's folder, as setuptools wants them,
    unless `absolute` (cffi's own compile() runs in a folder of its own)."""
    ffi = FFI()
    ffi.cdef(cdef_text())
    root = HERE.parent.parent

    def path(file: Path) -> str:
        return str(file if absolute else file.relative_to(root))

    ffi.set_source(
        f"tokenwire.service.kernels._{name}",
        '#include "kernels.h"',
        sources=[path(HERE / source) for source in SOURCES],
        include_dirs=[path(HERE)],
        extra_compile_args=[*COMMON, *flags],
        extra_link_args=["-pthread", *link],
        libraries=["m"],
    )
    return ffi


def build_flags() -> dict[str, list[str]]:
    """What set-up builds on this machine: every x86-64 level, or one portable build elsewhere."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        found = {name: flags for name, (_, flags) in X86_BUILDS.items()}
    else:
        found = {"portable": []}
    if os.environ.get("TOKENWIRE_KERNELS_NATIVE") == "1":
        found[f"native_{cpu_key()}"] = ["-march=native"]
    return found


# setup.py names each build as "build.py:<name>"; cffi looks the name up here and calls it for its FFI.
globals().update({name: functools.partial(builder, name, flags) for name, flags in build_flags().items()})


def build_sanitized() -> Path:
    """The kernels with ASan and UBSan, for this CPU's instructions, into this folder."""
    ffi = builder("sanitized", ["-O1", "-g", "-march=native", *SANITIZERS], tuple(SANITIZERS), absolute=True)
    with tempfile.TemporaryDirectory() as scratch:
        built = Path(ffi.compile(tmpdir=scratch, verbose=False))
        target = HERE / built.name
        shutil.copy2(built, target)
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["sanitized"]:
        sys.exit("usage: build.py sanitized")
    print(build_sanitized())
