"""The C kernels as Python calls: pick the build this CPU runs, check shapes, raise on failure.

The kernels are compiled at set-up (build.py), once per instruction set. At the first call this
module loads the portable build, asks it which level the CPU has (cpu.c), and takes the best build
at or below it; TOKENWIRE_KERNELS=<build> forces one (tests, the sanitizer run), and
TOKENWIRE_NATIVE=0 turns them off (callers then keep torch's ops). Every kernel returns a status:
a failure raises KernelError here, so a failed step ends its requests and the server goes on.
Threads are the kernels' own (thread_pool.c says why not OpenMP's).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from types import ModuleType
from typing import Any

import numpy as np
import torch

from tokenwire.service.kernels.build import X86_BUILDS, cpu_key

log = logging.getLogger("tokenwire.model")

TILE = 16  # output columns per vector in the block matmuls: they take layers whose width is a multiple
# build -> the level kernels_cpu_level() must report for it to run, best first (build.py builds them)
_LEVELS = {name: level for name, (level, _) in X86_BUILDS.items()}
_STATUS = {1: "out of memory", 2: "not supported by this build of the kernels", 3: "bad argument"}


class KernelError(RuntimeError):
    """A kernel answered with a failure status (kernels.h's kernel_status)."""


class NotBuilt(RuntimeError):
    """The kernels were not compiled at set-up (or a forced build is missing or cannot run here)."""


@functools.cache
def _load() -> ModuleType | None:
    if os.environ.get("TOKENWIRE_NATIVE", "1") == "0":
        return None
    try:
        module = pick_build()
    except NotBuilt as exc:
        log.warning("C kernels unavailable (%s): Q4_1 layers use torch's int4 kernel, Q8_0 stay dense", exc)
        return None
    amx = hasattr(module.lib, "amx_int8") and module.lib.amx_int8()
    log.info("C kernels: the %s build%s", module.__name__.rsplit("._", 1)[1], " (AMX tiles)" if amx else "")
    return module


def _import(build: str) -> ModuleType:
    try:
        return importlib.import_module(f"tokenwire.service.kernels._{build}")
    except ImportError as exc:
        raise NotBuilt(
            f"no {build!r} build of the kernels ({exc}); they are compiled at set-up: `make setup`, "
            "or `pip install -e .` with a C compiler (Debian: apt-get install gcc)"
        ) from exc


def cpu_level() -> int:
    """cpu.c's kernels_cpu_level(), asked of the portable build (it runs on any CPU)."""
    return int(_import("portable").lib.kernels_cpu_level())


def pick_build(level: int | None = None, forced: str | None = None) -> ModuleType:
    """The best build for a CPU of `level` (default: this one's), or `forced`
    (default: $TOKENWIRE_KERNELS; "native" is this CPU's -march=native build) if it runs there.
    Raises NotBuilt."""
    level = cpu_level() if level is None else level
    forced = os.environ.get("TOKENWIRE_KERNELS") if forced is None else forced
    if forced:
        if _LEVELS.get(forced, 0) > level:
            raise NotBuilt(f"the {forced!r} build needs instructions this CPU lacks (its level is {level})")
        return _import(_native_name() if forced == "native" else forced)
    with contextlib.suppress(NotBuilt):  # built only on request (TOKENWIRE_KERNELS_NATIVE=1 at set-up)
        return _import(_native_name())
    for build, needs in _LEVELS.items():
        if needs <= level:
            with contextlib.suppress(NotBuilt):
                return _import(build)
    raise NotBuilt("no build of the kernels runs on this CPU")


def _native_name() -> str:
    """This CPU's -march=native build: named after the CPU, so one from another CPU is never loaded."""
    return f"native_{cpu_key()}"


def available() -> bool:
    return _load() is not None


def build() -> str:
    """The build in use ("avx512_vnni", "avx2", "portable", ...), or "" without kernels."""
    module = _load()
    return "" if module is None else module.__name__.rsplit("._", 1)[1]


def _module() -> ModuleType:
    module = _load()
    if module is None:
        raise NotBuilt("the C kernels are not available here")
    return module


def int8_activations() -> bool:
    """Whether this build has block_matmul_int8.c (AVX512-VNNI)."""
    return available() and bool(_module().lib.int8_activations())


def amx_int8() -> bool:
    """Whether the 8-bit activations' sums run on AMX tiles here (16 rows and more): the same bits."""
    return int8_activations() and hasattr(_module().lib, "amx_int8") and bool(_module().lib.amx_int8())


def use_amx(on: bool) -> None:
    """Let the kernels use AMX where they can (the default), or never (tests compare the two)."""
    if available() and hasattr(_module().lib, "kernels_use_amx"):
        _module().lib.kernels_use_amx(int(on))


def grouped_blocks() -> bool:
    """Whether this build has q8_matmul_groups (8-bit blocks with minimums or groups of 16): builds
    from before it lack them, and those layers then stay dense."""
    return available() and hasattr(_module().lib, "q8_matmul_groups")


def half_kv_cache() -> bool:
    """Whether this build's attention takes a float16 KV cache (AVX-512)."""
    return available() and bool(_module().lib.half_kv_cache())


def struct_fields(ctype: str) -> frozenset[str]:
    """The fields this build's kernels.h gives a struct ("Layer", "Decoder"): a build from before a
    field was added lacks it, and its callers then keep to what it has."""
    return frozenset(name for name, _ in _module().ffi.typeof(ctype).fields) if available() else frozenset()


def threads() -> int:
    """The thread count torch's kernels use now (cpu_threads.py may lower it), for ours to match."""
    return torch.get_num_threads()


def pointer(data: torch.Tensor | np.ndarray | int | None) -> Any:
    """A C pointer to a tensor's or an array's data, or to an address; None and 0 are NULL.
    The caller keeps the data alive while C holds the pointer."""
    module = _module()
    if isinstance(data, torch.Tensor):
        data = data.data_ptr()
    elif isinstance(data, np.ndarray):
        data = data.ctypes.data
    return module.ffi.cast("void *", data) if data else module.ffi.NULL


def new(ctype: str, init: Any = None) -> Any:
    """A C object of one of kernels.h's types (owned by the returned cdata: keep it alive)."""
    return _module().ffi.new(ctype, init)


def check(status: int, kernel: str) -> None:
    if status:
        raise KernelError(f"{kernel}: {_STATUS.get(status, f'status {status}')}")


def block_matmul(
    bits: int, int8: bool, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
    minimum: torch.Tensor | None, out: torch.Tensor, group: int = 32,
) -> None:  # fmt: skip
    """out[M, N] = x[M, K] @ W.T on a layer's blocks (block_matmul.c, or _int8.c with `int8`).
    8-bit blocks may have a minimum per group and groups of 16 (q8_matmul_groups)."""
    lib = _module().lib
    rows, inner = x.shape
    if not (x.dtype == out.dtype == torch.float32 and x.is_contiguous() and out.is_contiguous()):
        raise ValueError("block_matmul takes contiguous float32 activations and output")
    if out.shape[0] != rows or out.shape[1] % TILE or inner % 32 or group not in (16, 32):
        raise ValueError(f"block_matmul: shapes {tuple(x.shape)} -> {tuple(out.shape)}, groups of {group}")
    if scale.numel() != out.shape[1] * (inner // group) or (
        minimum is not None and minimum.numel() != scale.numel()
    ):
        raise ValueError(
            f"block_matmul: {scale.numel()} scales for {out.shape[1]} x {inner} in groups of {group}"
        )
    grouped = bits == 8 and (minimum is not None or group != 32)
    name = (
        ("q4" if bits == 4 else "q8") + "_matmul" + ("_groups" if grouped else "") + ("_int8" if int8 else "")
    )
    args = [pointer(x), rows, inner, pointer(codes), pointer(scale)]
    if bits == 4:
        assert minimum is not None and group == 32, "Q4_1 blocks have a minimum, per 32"
        args.append(pointer(minimum))
    elif grouped:
        args.extend([pointer(minimum), group])
    check(getattr(lib, name)(*args, out.shape[1], pointer(out), threads()), name)


def decode_attention(
    query: torch.Tensor,  # [rows, heads, 1, head_dim], rows and heads at any stride
    key: torch.Tensor,  # [rows, kv_heads, 1, head_dim]: written into the cache at `positions`
    value: torch.Tensor,
    cache_k: torch.Tensor,  # [max_rows, kv_heads, max_len, head_dim]
    cache_v: torch.Tensor,
    positions: torch.Tensor,  # [rows] int64
    slots: torch.Tensor | None,  # [rows] int64 or None: row r's own
    scale: float,
    out: torch.Tensor,  # [rows, heads, 1, head_dim] float32, contiguous
    window: int | None = None,  # each row attends to its last `window` positions; None: all
    softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap); None: none
) -> None:
    rows, heads, _, head_dim = query.shape
    for name, index in (("positions", positions), ("slots", slots)):
        if index is not None and not (
            index.dtype == torch.int64 and index.is_contiguous() and len(index) == rows
        ):
            raise ValueError(f"decode_attention: {name} must be a contiguous int64 tensor, one per row")
    if (window is not None and window < 1) or (softcap is not None and not softcap > 0):
        raise ValueError(f"decode_attention: window {window}, softcap {softcap}")
    status = _module().lib.decode_attention(
        pointer(query), query.stride(0), query.stride(1),
        pointer(key), key.stride(0), key.stride(1),
        pointer(value), value.stride(0), value.stride(1),
        pointer(cache_k), pointer(cache_v), int(cache_k.dtype == torch.float16),
        pointer(positions), pointer(slots),
        rows, heads, key.shape[1], head_dim, cache_k.shape[0], cache_k.shape[2],
        window or 0, softcap or 0.0, scale, pointer(out), threads(),
    )  # fmt: skip
    check(status, "decode_attention")


def argmax_rows(logits: torch.Tensor, out: np.ndarray) -> None:
    """out[r] = the first maximum of logits[r] (or its first NaN), as numpy's argmax."""
    rows, vocab = logits.shape
    if not (logits.dtype == torch.float32 and logits.is_contiguous()):
        raise ValueError("argmax_rows takes contiguous float32 logits")
    if out.dtype != np.int64 or len(out) < rows:
        raise ValueError("argmax_rows writes int64, one per row")
    _module().lib.argmax_rows(pointer(logits), rows, vocab, pointer(out), threads())


def decoder_step(
    decoder: Any, ids: np.ndarray, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
    positions: np.ndarray, slots: np.ndarray | None, logits: torch.Tensor | None, argmax: np.ndarray | None,
) -> None:  # fmt: skip
    """decoder_step.c over `decoder` (a `Decoder *` from `new`); model/decoder_step.py checks the shapes."""
    status = _module().lib.decoder_step(
        decoder, pointer(ids), pointer(x),
        pointer(cos), pointer(sin),
        pointer(positions), pointer(slots), len(ids),
        pointer(logits), pointer(argmax),
        threads(),
    )  # fmt: skip
    check(status, "decoder_step")


def matrix_rows(matrix: Any, ids: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = row ids[i] of a `Matrix *`'s weight, as its blocks dequantize (decoder_step.c's
    embedding lookup on a tied lm_head's blocks; tests and the check at set-up)."""
    if not (ids.dtype == torch.int64 and ids.is_contiguous() and out.dtype == torch.float32):
        raise ValueError("matrix_rows takes contiguous int64 ids and float32 rows")
    if out.shape != (len(ids), matrix.in_features) or not out.is_contiguous():
        raise ValueError(f"matrix_rows: {len(ids)} rows of {matrix.in_features} into {tuple(out.shape)}")
    if len(ids) and not (int(ids.min()) >= 0 and int(ids.max()) < matrix.out_features):
        raise ValueError(f"matrix_rows: ids must be in [0, {matrix.out_features})")
    _module().lib.matrix_rows(matrix, pointer(ids), len(ids), pointer(out))


def fail_allocation(after: int) -> None:
    """Tests: make the kernels' `after`-th allocation from now fail, once (-1: none)."""
    _module().lib.kernels_fail_allocation(after)
