"""Kernels written in C (block_matmul.c and block_matmul_int8.c, decode_attention.c, decoder_step.c),
compiled where they run.

Compiled once per source, compiler and CPU into the cache (about a second with gcc) with
-march=native, then loaded from there and called through ctypes (which releases the GIL). Their
threads are their own (thread_pool.c says why not OpenMP's). Without a C compiler, or with
TOKENWIRE_NATIVE=0, `library()` is None and callers keep torch's ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from tokenwire.service.model.cache import cache_root

log = logging.getLogger("tokenwire.model")

TILE = 16  # output columns per vector in block_matmul.c: it takes layers whose width is a multiple
_SOURCES = [
    Path(__file__).with_name(f"{name}.c")
    for name in ("thread_pool", "block_matmul", "block_matmul_int8", "decode_attention", "decoder_step")
]
_HEADERS = [Path(__file__).with_name(name) for name in ("vec16.h", "thread_pool.h")]
_COMPILE = ["-O3", "-march=native", "-ffp-contract=fast", "-pthread", "-fPIC"]
_BUILD_SECONDS = 120


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (the reason is logged once)."""
    if os.environ.get("TOKENWIRE_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning(
            "C kernels unavailable: Q4_1 layers use torch's slower int4 kernel, Q8_0 stay dense: %s", exc
        )
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.q4_matmul.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.q8_matmul.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.q4_matmul_int8.argtypes = lib.q4_matmul.argtypes
    lib.q8_matmul_int8.argtypes = lib.q8_matmul.argtypes
    lib.int8_activations.argtypes = []
    lib.half_kv_cache.argtypes = []
    strided: list[Any] = [ptr, i64, i64]  # base, row stride, head stride
    lib.decode_attention.argtypes = [
        *strided * 3,
        ptr,  # cache_k
        ptr,  # cache_v
        ctypes.c_int,  # half: the cache holds float16
        ptr,  # positions
        ptr,  # slots (NULL: row r's own)
        *[i64] * 5,
        ctypes.c_float,
        ptr,
        ctypes.c_int,
    ]
    lib.decoder_step.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.argmax_rows.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
    kernels = (lib.q4_matmul, lib.q8_matmul, lib.q4_matmul_int8, lib.q8_matmul_int8, lib.decode_attention)
    for kernel in (*kernels, lib.decoder_step, lib.argmax_rows):
        kernel.restype = None
    return lib


def threads() -> int:
    """The thread count torch's kernels use now (cpu_threads.py may lower it), for ours to match."""
    return torch.get_num_threads()


def _build() -> Path:
    compiler = os.environ.get("CC", "cc")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    sources = [source.read_text() for source in (*_SOURCES, *_HEADERS)]
    key = hashlib.sha256(
        "\0".join([*sources, version, " ".join(_COMPILE), platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    name = f"tokenwire-{key}.so"
    cache = cache_root() / "kernels"
    if (cache / name).exists():
        return cache / name
    try:
        cache.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache, os.W_OK)
    except OSError:
        writable = False
    # A read-only cache: build in a temp folder of our own. Never load a library from a folder
    # that someone else could have written to.
    folder = cache if writable else _private_temp_folder()
    return folder / name if (folder / name).exists() else _compile(compiler, folder / name)


def _private_temp_folder() -> Path:
    if not hasattr(os, "getuid"):
        raise OSError("the kernel cache is read-only")
    folder = Path(tempfile.gettempdir()) / f"tokenwire-kernels-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{folder} is not ours alone: not loading kernels from it")
    return folder


def _compile(compiler: str, target: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        objects = [str(Path(scratch, source.stem + ".o")) for source in _SOURCES]
        for source, obj in zip(_SOURCES, objects, strict=True):
            _run([compiler, *_COMPILE, "-c", str(source), "-o", obj])
        lib = Path(scratch, "tokenwire.so")
        _run([compiler, "-shared", "-pthread", *objects, "-o", str(lib), "-lm"])
        os.replace(lib, target)  # atomic: servers starting together each build, one file wins
    log.info("compiled %s into %s", ", ".join(s.name for s in _SOURCES), target)
    return target


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_SECONDS)
    if done.returncode:
        raise OSError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")


def _cpu_flags() -> str:
    """What -march=native sees: a kernel cached for one CPU must not run on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    found = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)
    return found.group(1).strip() if found else platform.processor()
