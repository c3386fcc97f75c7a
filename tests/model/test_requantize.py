"""`--weights q8_0`: a transformers folder's layers quantized to Q8_0 blocks at load, so that a folder
model decodes in the C step: its greedy tokens are transformers' over those blocks, and its logits
stay within Q8_0's rounding of the dense model's."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.model.test_architectures import CASES, NEW_TOKENS, prompts, tiny
from tests.models import reference_greedy, runner_greedy, tokenizer
from tokenwire.service.kernels import ops
from tokenwire.service.model.loading import load_model, resolve_model
from tokenwire.service.model.quantized import BlockLinear
from tokenwire.service.model.runner import ModelRunner

CPU = torch.device("cpu")


@pytest.mark.skipif(not ops.available(), reason="Q8_0 blocks need the C kernels")
@pytest.mark.parametrize("name", ["qwen2", "phi3", "gemma3"])
def test_a_folder_runs_on_q8_0_blocks_in_the_c_step(name: str, tmp_path: Path) -> None:
    model_type, overrides = CASES[name]
    dense = tiny(model_type, **overrides)
    with torch.no_grad():  # biases that show if they were dropped (transformers starts them at 0)
        for parameter_name, parameter in dense.named_parameters():
            if parameter_name.endswith(".bias"):
                parameter.copy_(
                    torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)) * 0.1
                )
    dense.save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    model, folder_tokenizer = load_model(resolve_model(str(tmp_path)), CPU, torch.float32, "q8_0", "float32")
    blocks = [m for m in model.modules() if isinstance(m, BlockLinear)]
    projections = 4 if name == "phi3" else 7
    assert len(blocks) == dense.config.num_hidden_layers * projections + 1  # and the lm_head
    assert {m.format for m in blocks} == {"q8_0"}
    quantized = copy.deepcopy(model)
    runner = ModelRunner(model, folder_tokenizer, name=name, source="test", max_batch_size=2)
    assert runner.decode_kernel == "c"
    prompt = prompts()[2]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        error = (quantized(ids).logits - dense(ids).logits).abs()
        assert float(error.mean()) < 0.02 and float(error.max()) < 0.2  # logits of std ~1
    tokens = runner_greedy(runner, prompt, NEW_TOKENS)
    assert tokens == reference_greedy(quantized, prompt, NEW_TOKENS)


def test_q8_0_weights_are_refused_off_the_cpu_or_float32(tmp_path: Path) -> None:
    tiny("llama").save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="q8_0 runs on CPU in float32"):
        load_model(resolve_model(str(tmp_path)), CPU, torch.bfloat16, "q8_0")
