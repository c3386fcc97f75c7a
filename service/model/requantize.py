"""Dense layers to Q8_0 blocks at load (`--weights q8_0`), as llama.cpp's converter writes a Q8_0 file.

A transformers folder (or a GGUF file's float tensors) loads dense, and dense layers decode through
torch, layer by layer; on blocks every layer runs in decoder_step.c, several times faster at one
stream. Q8_0 keeps 8 bits and a scale per 32 weights: the outputs are those of the Q8_0 weights (the
same that llama.cpp serves from a Q8_0 file), no longer transformers' bit for bit, which is why it
is asked for by name and never the default. The `gguf` package quantizes, so the blocks are the ones
its Q8_0 file would hold, read by the same reader as a file's.
"""

from __future__ import annotations

import logging
from typing import Any

import gguf
from torch import nn

from tokenwire.service.model.gguf_blocks import read_q8_0
from tokenwire.service.model.quantized import BlockLinear, can_run

log = logging.getLogger("tokenwire.model")

_Q8_0 = gguf.GGMLQuantizationType.Q8_0
_BLOCK = 32  # weights per Q8_0 block: a layer's inputs must fill whole blocks


def quantize_to_q8_0(model: Any, activations: str) -> int:
    """Replace every dense nn.Linear of the decoder layers, and the lm_head, by BlockLinear on Q8_0
    blocks (biases kept as they are); returns how many were replaced. A layer no kernel takes (inputs
    not a multiple of 32, outputs not of 16) stays dense."""
    head = model.get_output_embeddings()
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (".layers." in name or module is head)
    ]
    replaced = 0
    for name in names:  # by name: each dense layer is freed as its blocks replace it, not at the end
        module = model.get_submodule(name)
        if module.in_features % _BLOCK:
            continue
        rows = gguf.quants.quantize(module.weight.detach().float().numpy(), _Q8_0)
        weight = read_q8_0(rows, (module.out_features, module.in_features))
        if not can_run(weight):
            continue
        parent_name, _, attr = name.rpartition(".")
        block = BlockLinear(weight, activations, "q8_0", bias=module.bias)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, block)
        replaced += 1
    log.info("%d dense layers quantized to Q8_0 blocks (--weights q8_0)", replaced)
    return replaced
