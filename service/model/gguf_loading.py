"""A model built straight from a GGUF file: block tensors become BlockLinear layers, the rest float.

No float32 unpacking of the whole file and no second copy on disk: the layers whose type has a
reader (gguf_blocks.py) and a kernel take the file's blocks as they are, every other tensor (norms,
the embedding, a type without a kernel) is dequantized by the `gguf` package and handed through
transformers' own per-architecture processing (Gemma's norms, ...). A block tensor that processing
would change other than by reordering its rows (llama's q/k permutation) stays dense, so a layer
never runs on weights transformers would not have given it.
"""

from __future__ import annotations

import copy
import functools
import logging
import struct
import threading
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)

from tokenwire.service.kernels import ops
from tokenwire.service.model.architectures import UnsupportedModelError
from tokenwire.service.model.gguf_blocks import READERS
from tokenwire.service.model.quantized import (
    BlockLinear,
    BlockWeight,
    Q4Matmul,
    Q8Matmul,
    can_run,
    map_tensors,
)

log = logging.getLogger("tokenwire.model")

_NAME_TABLE_SWAP = threading.Lock()
_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


def build_model(gguf_path: Path, config: Any, dtype: torch.dtype, *, blocks: bool, activations: str) -> Any:
    """The model of `config` with the file's tensors: on blocks where `blocks` and a kernel takes them."""
    file = np.memmap(gguf_path, mode="r", dtype=np.uint8)
    header = read_header(file)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=config.to_dict())
    names = _weights_map(model, processor)
    params = dict(model.named_parameters())
    tied_head = config.tie_word_embeddings and model.get_output_embeddings() is not None
    loaded: set[str] = set()
    dense_types: Counter[str] = Counter()
    on_blocks: Counter[str] = Counter()
    embedding = _embedding_name(model)
    rope_factors = None
    for info in header.tensors:
        target = names.get(info.name)
        weight_name = info.name.removesuffix(".bias") + ".weight"
        if target is None and info.name.endswith(".bias") and weight_name in names:
            # a bias for a layer the config builds without one: running it would drop the bias
            raise UnsupportedModelError(
                f"{gguf_path}: {info.name} is a bias the model built from its metadata has no place for "
                f"({names[weight_name]} has none); tokenwire would not run it exactly"
            )
        data = file[header.data_start + info.offset : header.data_start + info.offset + info.nbytes]
        if info.name == "rope_freqs.weight":
            rope_factors = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(info.ggml_type)).reshape(-1)
            continue
        if target is None or target not in params:  # tensors the model does not read
            continue
        kind = gguf.GGMLQuantizationType(info.ggml_type)
        quantized = kind not in _FLOAT_TYPES
        if blocks and target != embedding and _is_linear_weight(model, target):
            block = _block_layer(processor, info.name, data, kind, info.shape, activations)
            if block is not None:
                # the linear's own bias parameter, which its tensor (before or after) is read into
                block.bias = model.get_submodule(target.rpartition(".")[0]).bias
                _replace(model, target.rpartition(".")[0], block)
                loaded.add(target)
                on_blocks[kind.name] += 1
                continue
            if quantized:
                dense_types[kind.name] += 1
        if target == embedding and tied_head and blocks:
            head = _block_layer(processor, info.name, data, kind, info.shape, activations)
            if head is not None:  # the tied lm_head on the embedding's blocks (SmolLM2's, Gemma's)
                model.set_output_embeddings(head)
                on_blocks[kind.name] += 1
                lookup = _block_embedding(
                    model.get_input_embeddings(), head, processor, info.name, data, kind
                )
                if lookup is not None:  # and the lookup on them too: no float32 table
                    _replace(model, target.rpartition(".")[0], lookup)
                    loaded.add(target)
                    continue
            elif quantized:
                dense_types[kind.name] += 1
        param = params[target]
        if tuple(info.shape) != tuple(param.shape):
            raise ValueError(
                f"{gguf_path}: {info.name} has shape {info.shape}, {target} {tuple(param.shape)}"
            )
        # A large tensor (Gemma's embedding: 671 MB in float32) in slices of rows, where the
        # processing keeps rows in place: a whole float32 copy beside the parameter doubled the peak.
        rows = np.asarray(data).reshape(*info.shape[:-1], -1)
        order = _row_order(processor, info.name, len(rows)) if rows.ndim == 2 else None
        keeps_rows = order is not None and np.array_equal(order, np.arange(len(rows)))
        step = 16384 if keeps_rows else len(rows)
        with torch.no_grad():
            for at in range(0, len(rows), step):
                values = gguf.quants.dequantize(rows[at : at + step], kind)
                done = processor.process(
                    weights=values, name=info.name, tensor_key_mapping=names, parsed_parameters={}
                )
                param[at : at + step].copy_(
                    torch.from_numpy(np.require(done.weights, np.float32, ["C", "W"]))
                )
        loaded.add(target)
    head = model.get_output_embeddings()
    if tied_head and not isinstance(head, BlockLinear):  # from_config leaves the tie to from_pretrained
        head.weight = model.get_input_embeddings().weight
    _check_complete(model, loaded, gguf_path, tied_head)
    if rope_factors is not None:
        _divide_rope_frequencies(model, torch.from_numpy(np.array(rope_factors, dtype=np.float32)), gguf_path)
    for kind_name, count in sorted(dense_types.items()):
        log.info("%d layers of type %s have no kernel here: unpacked to float32", count, kind_name)
    if on_blocks:
        log.info(
            "layers on the file's blocks: %s", ", ".join(f"{n} {k}" for k, n in sorted(on_blocks.items()))
        )
    return model.eval()


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # torch order: [out, in]
    ggml_type: int
    offset: int  # from data_start
    nbytes: int


class Header(NamedTuple):
    architecture: str
    tensors: list[TensorInfo]
    data_start: int
    metadata: dict[str, Any]  # the scalar and string keys (arrays, the vocabulary among them, skipped)


# GGUF metadata value types of fixed width -> struct format (8 is a string, 9 an array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_header(file: np.ndarray) -> Header:
    """The architecture, metadata and tensor table of a GGUF file (v2/v3), skipping arrays (the
    vocabulary): gguf's
    GGUFReader takes ~14 s over Gemma's 262k tokens, this ~0.2."""
    blob = memoryview(file)  # type: ignore[arg-type]
    if bytes(blob[:4]) != b"GGUF":
        raise ValueError("not a GGUF file")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not read here (2 and 3 are)")
    pos = 24

    def string() -> str:
        nonlocal pos
        (length,) = struct.unpack_from("<Q", blob, pos)
        pos += 8 + length
        return bytes(blob[pos - length : pos]).decode("utf-8", "replace")

    def skip(kind: int) -> Any:
        nonlocal pos
        if kind in _SCALARS:
            (value,) = struct.unpack_from("<" + _SCALARS[kind], blob, pos)
            pos += struct.calcsize(_SCALARS[kind])
            return value
        if kind == 8:
            return string()
        element, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if element in _SCALARS:
            pos += count * struct.calcsize(_SCALARS[element])
        else:
            for _ in range(count):
                skip(element)
        return None

    metadata = {}
    for _ in range(kv_count):
        key = string()
        (kind,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        metadata[key] = skip(kind)
    tensors = []
    for _ in range(tensor_count):
        name = string()
        (dims,) = struct.unpack_from("<I", blob, pos)
        shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        values, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        nbytes = int(np.prod(shape)) // values * size
        tensors.append(TensorInfo(name, tuple(reversed(shape)), ggml_type, offset, nbytes))
    alignment = int(metadata.get("general.alignment") or 32)
    return Header(
        str(metadata["general.architecture"]),
        tensors,
        (pos + alignment - 1) // alignment * alignment,
        {key: value for key, value in metadata.items() if value is not None},
    )


def _divide_rope_frequencies(model: Any, factors: torch.Tensor, gguf_path: Path) -> None:
    """llama.cpp's `rope_freqs` tensor: a factor per rotary frequency that each angle is divided by
    (how its converter writes Llama 3.x's rope scaling, with no rope metadata). transformers' GGUF
    loading ignores it and would rotate with the plain frequencies, silently wrong; here the model's
    frequencies are divided by the factors, as llama.cpp computes them."""
    rotary = model.get_decoder().rotary_emb
    frequencies = getattr(rotary, "inv_freq", None)
    rope_type = getattr(rotary, "rope_type", None)
    if rope_type != "default" or frequencies is None or frequencies.shape != factors.shape:
        shape = None if frequencies is None else tuple(frequencies.shape)
        raise UnsupportedModelError(
            f"{gguf_path}: rope_freqs has {tuple(factors.shape)} factors for a {rope_type} rope of {shape} "
            "frequencies; tokenwire takes them for a default rope with one factor per frequency"
        )
    with torch.no_grad():
        for name in ("inv_freq", "original_inv_freq"):
            buffer = getattr(rotary, name, None)
            if buffer is not None:
                buffer.copy_(buffer / factors.to(buffer.dtype))
    log.info("rope frequencies divided by the file's rope_freqs (Llama 3 rope scaling)")


def _weights_map(model: Any, processor: Any) -> dict[str, str]:
    """GGUF tensor name -> parameter name, as transformers maps them. Its function recurses into every
    submodule and builds gguf's name table (thousands of formatted names) anew at each: 4.7 of the
    default model's 6.9 s of loading here. The table depends on the architecture and the layer count
    alone, so it is built once for the call (gguf's function, read by name at each recursion)."""
    with _NAME_TABLE_SWAP:  # two loads at once must not restore each other's cached function
        build_table = gguf.get_tensor_name_map
        gguf.get_tensor_name_map = functools.cache(build_table)  # type: ignore[assignment]
        try:
            return dict(get_gguf_hf_weights_map(model, processor))
        finally:
            gguf.get_tensor_name_map = build_table  # type: ignore[assignment]


def _embedding_name(model: Any) -> str:
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding) + ".weight"


def _is_linear_weight(model: Any, target: str) -> bool:
    """Whether `target` is the weight of an nn.Linear (what BlockLinear replaces)."""
    module_name, _, leaf = target.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(module_name), nn.Linear)


def _replace(model: Any, module_name: str, block: nn.Module) -> None:
    parent_name, _, attr = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, block)


def _block_layer(
    processor: Any,
    name: str,
    data: np.ndarray,
    kind: gguf.GGMLQuantizationType,
    shape: tuple[int, ...],
    activations: str,
) -> BlockLinear | None:
    read = READERS.get(int(kind))
    if read is None or len(shape) != 2:
        return None
    out, inp = shape
    rows = np.asarray(data).reshape(out, -1)
    order = _row_order(processor, name, out)
    if order is None:
        return None
    weight = read(rows, (out, inp))
    # the reader against gguf's own dequantization, on a few rows (the tests check every type whole)
    if not np.array_equal(
        read(rows[:4], (min(4, out), inp)).dequantize().numpy(), gguf.quants.dequantize(rows[:4], kind)
    ):
        log.warning("%s: its %s blocks do not read as gguf dequantizes them; it stays dense", name, kind.name)
        return None
    if not np.array_equal(order, np.arange(out)):
        weight = _reorder(weight, torch.from_numpy(order))
    if not can_run(weight):
        return None
    return BlockLinear(weight, activations, kind.name.lower())


class BlockEmbedding(nn.Module):
    """A tied embedding looked up on its lm_head's blocks (the file's own), then scaled as the
    model's embedding module scales it (Gemma's sqrt(hidden)): the same float32 rows as the dense
    table, without it (Gemma 3: 671 MB of float32 beside 178 MB of Q8_0 blocks).

    `weight` gives the whole table, made once on first use, for code that wants it as a tensor
    (decoder_step.c's lookup for llama models); the torch path never asks for it."""

    embed_scale: torch.Tensor | None  # a buffer (register_buffer), typed for what it holds

    def __init__(self, head: BlockLinear, embed_scale: torch.Tensor | None, padding_idx: int | None) -> None:
        super().__init__()
        self._head = (head,)  # a tuple: the head is the model's module, not a second submodule here
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = padding_idx
        # A buffer (not saved) when given, as in the module it replaces.
        self.register_buffer("embed_scale", embed_scale, persistent=False)
        self._table: torch.Tensor | None = None

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows [len(ids), dim] of the flat ids, from the blocks of the tiles they fall in."""
        return block_rows(self._head[0], ids.reshape(-1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self._table[input_ids] if self._table is not None else self.lookup(input_ids)
        rows = rows.view(*input_ids.shape, self.embedding_dim)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)

    @property
    def weight(self) -> torch.Tensor:
        if self._table is None:
            self._table = self.lookup(torch.arange(self.num_embeddings))
        return self._table

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on the lm_head's {self._head[0].format} blocks"


def block_rows(layer: BlockLinear, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a block layer's weight in float32, as its blocks dequantize: the tiles of
    ops.TILE rows the ids fall in are unpacked from the kernel's layout, then the rows picked."""
    matmul = layer.matmul
    if layer._blocks is not None:  # torch's int4 kernel keeps the blocks as they are
        return map_tensors(layer._blocks, lambda t: t[ids]).dequantize()
    assert isinstance(matmul, Q4Matmul | Q8Matmul), "the layer's blocks were released to decoder_step.c"
    tiles, where = torch.unique(ids // ops.TILE, return_inverse=True)
    part = copy.copy(matmul)  # the same matmul over those tiles only (every layout is tiles first)
    part.codes = matmul.codes[tiles]
    part.scale = matmul.scale[tiles]
    part.minimum = None if matmul.minimum is None else matmul.minimum[tiles]
    part.out_features = len(tiles) * ops.TILE
    table = part.blocks().dequantize()
    return table[where * ops.TILE + ids % ops.TILE]


def _block_embedding(
    embedding: Any,
    head: BlockLinear,
    processor: Any,
    name: str,
    data: np.ndarray,
    kind: gguf.GGMLQuantizationType,
) -> BlockEmbedding | None:
    """The embedding on the tied head's blocks, where that gives exactly the rows the dense table
    would hold (checked on a few rows against gguf's dequantization and transformers' processing)
    and the module is one whose forward is known: nn.Embedding, or Gemma's scaled one."""
    scaled = type(embedding).__name__.endswith("ScaledWordEmbedding")
    if type(embedding) is not nn.Embedding and not scaled:
        return None
    if embedding.max_norm is not None or (head.out_features, head.in_features) != tuple(
        embedding.weight.shape
    ):
        return None
    out = head.out_features
    rows = np.asarray(data).reshape(out, -1)
    sample = np.unique(np.array([0, 1, 2, out // 2, out - 2, out - 1]))
    expected = processor.process(
        weights=gguf.quants.dequantize(rows[sample], kind),
        name=name,
        tensor_key_mapping={},
        parsed_parameters={},
    ).weights
    got = block_rows(head, torch.from_numpy(sample)).numpy()
    if not np.array_equal(got, np.asarray(expected, dtype=np.float32)):
        log.warning(
            "%s: its blocks do not give the embedding's rows exactly; the embedding stays dense", name
        )
        return None
    scale = embedding.embed_scale.detach().clone() if scaled else None
    return BlockEmbedding(head, scale, embedding.padding_idx)


def _row_order(processor: Any, name: str, rows: int) -> np.ndarray | None:
    """How transformers' processing reorders this tensor's rows (llama's q/k), found by processing the
    row numbers; None where it does anything else (then the layer stays dense)."""
    index = np.stack([np.arange(rows, dtype=np.float64), np.arange(rows, dtype=np.float64) + 0.5], axis=1)
    try:
        done = np.asarray(
            processor.process(
                weights=index.copy(), name=name, tensor_key_mapping={}, parsed_parameters={}
            ).weights
        )
    except Exception:  # a processor that needs the real tensor: keep it dense
        return None
    if done.shape != index.shape or not np.array_equal(done[:, 1], done[:, 0] + 0.5):
        return None
    order = done[:, 0]
    if not np.array_equal(np.sort(order), index[:, 0]):
        return None
    return order.astype(np.int64)


def _reorder(weight: BlockWeight, order: torch.Tensor) -> BlockWeight:
    return map_tensors(weight, lambda t: t[order].contiguous())


def _check_complete(model: Any, loaded: set[str], gguf_path: Path, tied_head: bool) -> None:
    head = model.get_output_embeddings()
    head_names = {n + ".weight" for n, m in model.named_modules() if m is head} if tied_head else set()
    missing = [
        name
        for name, _ in model.named_parameters()
        if name not in loaded and name not in head_names and not _is_block(model, name)
    ]
    if missing:
        raise ValueError(f"{gguf_path}: no tensor in the file for {', '.join(missing[:5])}")


def _is_block(model: Any, name: str) -> bool:
    """Whether `name` is read from a block layer's own tensor (a BlockLinear's bias is a tensor of its
    own in the file: without it the parameter would keep whatever memory it was given)."""
    return not name.endswith(".bias") and isinstance(
        model.get_submodule(name.rpartition(".")[0]), BlockLinear
    )
