"""A GGUF file's projections on its own blocks with their biases (Qwen2's q/k/v): a file written here
with gguf's writer from a tiny Qwen2, read by gguf_loading.build_model, runs every layer in the C
step, with the file's biases, and decodes greedily as transformers does over the file's weights
dequantized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

from tests.model.test_architectures import CASES, NEW_TOKENS, prompts, tiny
from tests.models import reference_greedy, tokenizer
from tokenwire.service.kernels import ops
from tokenwire.service.model.gguf_loading import build_model
from tokenwire.service.model.quantized import BlockLinear
from tokenwire.service.model.runner import ModelRunner
from tokenwire.service.model.types import PrefillChunk, SamplingParams

Q8_0 = gguf.GGMLQuantizationType.Q8_0
SETTINGS = CASES["qwen2"][1] | {"initializer_range": 0.2}  # at 0.1 its greedy tokens repeat one


def write_gguf(model: Any, path: Path, architecture: str, leave_out: str = "") -> dict[str, torch.Tensor]:
    """The model's tensors in a GGUF file: 2-D weights as Q8_0 blocks, the rest float32 (a tied
    lm_head is the embedding's; `leave_out`: a parameter not written). Returns the state the file
    holds, dequantized, by parameter name."""
    names = {hf: name for name, hf in get_gguf_hf_weights_map(model, TensorProcessor()).items()}
    writer = gguf.GGUFWriter(path, architecture)
    held: dict[str, torch.Tensor] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == leave_out or (hf_name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        name = names[hf_name]
        data = tensor.detach().float().numpy()
        if data.ndim == 2:
            blocks = gguf.quants.quantize(data, Q8_0)
            writer.add_tensor(name, blocks, raw_dtype=Q8_0)
            data = gguf.quants.dequantize(blocks, Q8_0)
        else:
            writer.add_tensor(name, data)
        held[hf_name] = torch.from_numpy(np.array(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


@pytest.mark.skipif(
    not (ops.available() and "bias" in ops.struct_fields("Matrix")), reason="a build from before biases"
)
def test_a_qwen2_file_runs_on_its_blocks_with_its_biases(tmp_path: Path) -> None:
    source = tiny("qwen2", **SETTINGS)
    with torch.no_grad():  # biases large enough that a layer without its own would decode otherwise
        for name, parameter in source.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(
                    torch.randn(parameter.shape, generator=torch.Generator().manual_seed(4)) * 0.5
                )
    path = tmp_path / "tiny-qwen2.gguf"
    held = write_gguf(source, path, "qwen2")
    model = build_model(path, source.config, torch.float32, blocks=True, activations="float32")
    layer = model.model.layers[1].self_attn
    assert all(isinstance(p, BlockLinear) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    assert torch.equal(layer.q_proj.bias, held["model.layers.1.self_attn.q_proj.bias"])
    dense = tiny("qwen2", **SETTINGS)
    dense.load_state_dict(held, strict=False)
    dense.tie_weights()
    runner = ModelRunner(model, tokenizer(), name="qwen2", source="test", max_batch_size=2)
    assert runner.decode_kernel == "c"
    for prompt in prompts()[1:3]:
        expected = reference_greedy(dense, prompt, NEW_TOKENS)
        assert len(set(expected)) > 4
        runner.add_sequence(0, SamplingParams(), 0)
        tokens = [runner.prefill([PrefillChunk(0, prompt, True)])[0].token_id]
        while len(tokens) < len(expected):
            tokens.append(runner.decode({0: tokens[-1]})[0].token_id)
        runner.remove_sequence(0)
        assert tokens == expected


def test_a_file_without_a_block_layers_bias_is_refused(tmp_path: Path) -> None:
    """Its parameter would otherwise keep whatever memory the model was built with."""
    source = tiny("qwen2", **SETTINGS)
    path = tmp_path / "no-bias.gguf"
    write_gguf(source, path, "qwen2", leave_out="model.layers.2.self_attn.k_proj.bias")
    with pytest.raises(
        ValueError, match=r"no tensor in the file for model\.layers\.2\.self_attn\.k_proj\.bias"
    ):
        build_model(path, source.config, torch.float32, blocks=True, activations="float32")
