"""GGUF files of each architecture whose file layout is transformers' own (no llama q/k permutation,
no Gemma norm offset): written here with gguf's writer from a tiny model, read by
gguf_loading.build_model, every projection on its blocks (Qwen2's q/k/v with their biases), every
layer in the C step, and greedy tokens as transformers gives them over the file's weights
dequantized."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig
from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

from tests.model.test_architectures import CASES, NEW_TOKENS, prompts, tiny
from tests.models import reference_greedy, runner_greedy, tokenizer
from tokenwire.service.kernels import ops
from tokenwire.service.model.architectures import UnsupportedModelError
from tokenwire.service.model.gguf_config import complete_config
from tokenwire.service.model.gguf_loading import Header, build_model
from tokenwire.service.model.loading import resolve_model
from tokenwire.service.model.quantized import BlockLinear
from tokenwire.service.model.runner import ModelRunner

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def write_gguf(
    model: Any,
    path: Path,
    architecture: str,
    leave_out: str = "",
    metadata: Callable[[gguf.GGUFWriter], None] | None = None,
    permute_qk: bool = False,
    norms_plus_one: bool = False,
) -> dict[str, torch.Tensor]:
    """The model's tensors in a GGUF file: 2-D weights as Q8_0 blocks, the rest float32 (a tied
    lm_head is the embedding's; `leave_out`: a parameter not written), and what `metadata` adds;
    `permute_qk`: q and k rows in llama.cpp's rotary order, as its converter writes llama files;
    `norms_plus_one`: norm weights + 1, as it writes Gemma's.
    Returns the state the file holds, dequantized, by parameter name."""
    names = {hf: name for name, hf in get_gguf_hf_weights_map(model, TensorProcessor()).items()}
    writer = gguf.GGUFWriter(path, architecture)
    held: dict[str, torch.Tensor] = {}
    linears = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)
    }
    for hf_name, tensor in model.state_dict().items():
        if hf_name == leave_out or (hf_name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        name = names[hf_name]
        data = tensor.detach().float().numpy()
        heads = (
            model.config.num_attention_heads if ".q_proj." in hf_name else model.config.num_key_value_heads
        )
        permuted = permute_qk and (".q_proj." in hf_name or ".k_proj." in hf_name)
        if norms_plus_one and hf_name.endswith("norm.weight"):
            data = data + np.float32(1)
        if permuted:  # convert_hf_to_gguf.py's LlamaModel.permute
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(data.shape)
        if hf_name in linears:
            blocks = gguf.quants.quantize(data, Q8_0)
            writer.add_tensor(name, blocks, raw_dtype=Q8_0)
            data = gguf.quants.dequantize(blocks, Q8_0)
            if permuted:  # back, as the held state is transformers' order
                data = (
                    data.reshape(heads, data.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(data.shape)
                )
        else:
            writer.add_tensor(name, data)
        if norms_plus_one and hf_name.endswith("norm.weight"):
            data = data - np.float32(1)  # as transformers reads them back
        held[hf_name] = torch.from_numpy(np.array(data))
    if metadata is not None:
        metadata(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


# case -> the file's architecture name (gguf's)
FILES = {
    "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "smollm3": "smollm3", "starcoder2": "starcoder2",
    "olmo2": "olmo2", "granite": "granite", "cohere": "command-r",
}  # fmt: skip


@pytest.mark.skipif(
    not (ops.available() and "parallel" in ops.struct_fields("Decoder")), reason="a build from before them"
)
@pytest.mark.parametrize("name", list(FILES))
def test_a_file_runs_on_its_blocks_in_the_c_step(name: str, tmp_path: Path) -> None:
    model_type, overrides = CASES[name]
    settings = overrides | {"initializer_range": 0.2}  # at 0.1 some repeat one token
    source = tiny(model_type, **settings)
    with torch.no_grad():  # biases large enough that a layer without its own would decode otherwise
        for parameter_name, parameter in source.named_parameters():
            if parameter_name.endswith(".bias"):
                parameter.copy_(
                    torch.randn(parameter.shape, generator=torch.Generator().manual_seed(4)) * 0.5
                )
    path = tmp_path / f"tiny-{name}.gguf"
    held = write_gguf(source, path, FILES[name])
    model = build_model(path, source.config, torch.float32, blocks=True, activations="float32")
    projections = [
        m
        for n, m in model.named_modules()
        if ".layers." in n and isinstance(m, torch.nn.Linear | BlockLinear)
    ]
    assert projections and all(isinstance(m, BlockLinear) for m in projections)
    for parameter_name, parameter in model.named_parameters():  # biases, norms: the file's, exactly
        assert torch.equal(parameter, held[parameter_name]), parameter_name
    dense = tiny(model_type, **settings)
    dense.load_state_dict(held, strict=False)
    dense.tie_weights()
    runner = ModelRunner(model, tokenizer(), name=name, source="test", max_batch_size=2)
    assert runner.decode_kernel == "c"
    for prompt in prompts()[1:3]:
        expected = reference_greedy(dense, prompt, NEW_TOKENS)
        assert len(set(expected)) > 4
        assert runner_greedy(runner, prompt, len(expected)) == expected


def test_a_file_without_a_block_layers_bias_is_refused(tmp_path: Path) -> None:
    """Its parameter would otherwise keep whatever memory the model was built with."""
    source = tiny("qwen2", **CASES["qwen2"][1])
    path = tmp_path / "no-bias.gguf"
    write_gguf(source, path, "qwen2", leave_out="model.layers.2.self_attn.k_proj.bias")
    with pytest.raises(
        ValueError, match=r"no tensor in the file for model\.layers\.2\.self_attn\.k_proj\.bias"
    ):
        build_model(path, source.config, torch.float32, blocks=True, activations="float32")


def test_a_file_with_a_bias_the_config_has_no_place_for_is_refused(tmp_path: Path) -> None:
    """A Qwen2 file read as Qwen3 (whose config has no attention biases): the q/k/v biases would be
    dropped, so the file is refused, naming the tensor."""
    source = tiny("qwen2", **CASES["qwen2"][1])
    path = tmp_path / "biases.gguf"
    write_gguf(source, path, "qwen3")
    target = tiny("qwen3").config
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_q\.bias is a bias"):
        build_model(path, target, torch.float32, blocks=True, activations="float32")


def config_and_vocabulary(
    model: Any, more: Callable[[gguf.GGUFWriter], None] | None = None
) -> Callable[[gguf.GGUFWriter], None]:
    """A llama.cpp file's metadata for a tiny model: its config's keys as transformers maps them,
    what `more` adds (as llama.cpp's converter writes it), and the default model's vocabulary (the
    tiny models' own), copied from the SmolLM2 file."""
    vocabulary = gguf.GGUFReader(resolve_model("default").location)

    def add(writer: gguf.GGUFWriter) -> None:
        if more is not None:
            more(writer)
        config = model.config
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        rope = config.rope_parameters
        writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        for name, field in vocabulary.fields.items():
            if not name.startswith("tokenizer."):
                continue
            kind, item = field.types[0], field.types[-1]
            values = [
                bytes(field.parts[i]).decode()
                if item == gguf.GGUFValueType.STRING
                else field.parts[i].tolist()[0]
                for i in field.data
            ]
            if kind == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(name, values, kind, sub_type=item)
            else:
                writer.add_key_value(name, values[0], kind)

    return add


@pytest.mark.skipif(not ops.available(), reason="blocks need the C kernels")
def test_a_qwen2_file_loads_as_the_server_loads_it(tmp_path: Path) -> None:
    """`--model file.gguf`: the config and the vocabulary from the file's metadata, the layers on its
    blocks, every step in C, greedy tokens as transformers gives them over the file's weights."""
    source = tiny("qwen2", initializer_range=0.2)
    path = tmp_path / "tiny-qwen2.gguf"
    held = write_gguf(source, path, "qwen2", metadata=config_and_vocabulary(source))
    runner = ModelRunner.load(str(path), max_batch_size=2, activations="float32")
    assert runner.decode_kernel == "c"
    config = runner.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (4, 64, 2)
    dense = tiny("qwen2", initializer_range=0.2)
    dense.load_state_dict(held, strict=False)
    dense.tie_weights()
    text = "The quick brown fox"
    prompt = runner.tokenizer(text).input_ids
    assert prompt == tokenizer()(text).input_ids  # the file's vocabulary is the default model's
    expected = reference_greedy(dense, prompt, NEW_TOKENS)
    assert runner_greedy(runner, prompt, len(expected)) == expected


def test_a_llama3_file_rotates_with_its_rope_freqs(tmp_path: Path) -> None:
    """llama.cpp writes Llama 3.x's rope scaling as a rope_freqs tensor and no rope metadata; read
    with the plain config the file's metadata gives, the model rotates as the Llama 3 config does."""
    llama3 = CASES["llama3-rope-biases"][1]["rope_scaling"]  # positions far past its original 64
    source = tiny("llama", initializer_range=0.2, rope_scaling=llama3)
    plain = tiny("llama", initializer_range=0.2)
    path = tmp_path / "llama3.gguf"
    factors = (plain.model.rotary_emb.inv_freq / source.model.rotary_emb.inv_freq).numpy()
    assert (factors > 1.5).any()  # the scaling changes these frequencies

    def rope_freqs(writer: gguf.GGUFWriter) -> None:
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))

    held = write_gguf(source, path, "llama", metadata=rope_freqs, permute_qk=True)
    model = build_model(path, plain.config, torch.float32, blocks=True, activations="float32")
    assert torch.allclose(model.model.rotary_emb.inv_freq, source.model.rotary_emb.inv_freq, rtol=1e-6)
    source.load_state_dict(held, strict=False)
    source.tie_weights()
    runner = ModelRunner(model, tokenizer(), name="llama3", source="test", max_batch_size=2)
    assert runner.decode_kernel == "c"
    prompt = prompts()[3]  # 75 tokens, and 40 more: past the original 64
    expected = reference_greedy(source, prompt, NEW_TOKENS)
    assert expected != reference_greedy(plain_with(held), prompt, NEW_TOKENS)  # the factors matter
    assert runner_greedy(runner, prompt, len(expected)) == expected


def plain_with(state: dict[str, torch.Tensor]) -> Any:
    model = tiny("llama", initializer_range=0.2)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


@pytest.mark.skipif(not ops.available(), reason="blocks need the C kernels")
@pytest.mark.parametrize("name", ["phi3", "phi3-longrope"])
def test_what_a_phi3_files_metadata_says_beyond_transformers_mapping_is_kept(
    name: str, tmp_path: Path
) -> None:
    """transformers' GGUF config for Phi-3 leaves out the sliding window, the rope's dimensions (a
    partial rotation) and the longrope factors (tensors): gguf_config.py puts them back, and the
    model decodes as transformers does with the original config (past the window; longrope within
    its original context, where the runner caps it)."""
    model_type, overrides = CASES[name]
    source = tiny(model_type, initializer_range=0.2, **overrides)
    config = source.config
    rope = config.rope_parameters

    def phi3_keys(writer: gguf.GGUFWriter) -> None:
        head_dim = config.hidden_size // config.num_attention_heads
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if config.sliding_window:
            writer.add_sliding_window(config.sliding_window)
        if rope["rope_type"] == "longrope":  # as the converter writes it, with transformers' attention factor
            writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
            writer.add_rope_scaling_attn_factors(source.model.rotary_emb.attention_scaling)
            writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
            writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))

    path = tmp_path / f"{name}.gguf"
    held = write_gguf(source, path, "phi3", metadata=config_and_vocabulary(source, phi3_keys))
    runner = ModelRunner.load(str(path), max_batch_size=2, activations="float32")
    loaded = runner.model.config
    assert loaded.sliding_window == config.sliding_window
    taken = {"rope_theta", "attention_factor"}  # the file's base; the converter's attention factor
    assert {k: v for k, v in loaded.rope_parameters.items() if k not in taken} == {
        k: v for k, v in rope.items() if k not in taken
    }
    assert runner.decode_kernel == "c"
    source.load_state_dict(held, strict=False)
    source.tie_weights()
    prompt = prompts()[3]  # 75 tokens and 40 more: past the window of 16, within longrope's 128
    expected = reference_greedy(source, prompt, NEW_TOKENS)
    assert runner_greedy(runner, prompt, len(expected)) == expected


def test_a_rope_scaling_a_config_cannot_take_is_refused(tmp_path: Path) -> None:
    source = tiny("qwen2")

    def scaling(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)  # not linear or yarn

    path = tmp_path / "scaled.gguf"
    write_gguf(source, path, "qwen2", metadata=config_and_vocabulary(source, scaling))
    with pytest.raises(UnsupportedModelError, match="longrope rope scaling"):
        ModelRunner.load(str(path), max_batch_size=2)


@pytest.mark.skipif(not ops.available(), reason="blocks need the C kernels")
def test_a_gemma3_file_with_linear_rope_scaling_scales_its_global_layers(tmp_path: Path) -> None:
    """Gemma 3 4B and up: llama.cpp writes the global layers' linear rope scaling as metadata, which
    transformers' mapping drops; the loaded config has it, and the model decodes as the original."""
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    }
    # six layers: the sixth is global in Gemma 3's pattern, the one llama.cpp assumes
    source = tiny(
        "gemma3_text",
        num_hidden_layers=6,
        sliding_window=16,
        rope_parameters=rope,
        initializer_range=0.2,
        query_pre_attn_scalar=16,  # 1 / sqrt(head_dim), as llama.cpp scales every Gemma 3 but the 27B's
    )
    config = source.config

    def gemma3_keys(writer: gguf.GGUFWriter) -> None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(8.0)

    path = tmp_path / "gemma3.gguf"
    metadata = config_and_vocabulary(source, gemma3_keys)
    held = write_gguf(source, path, "gemma3", metadata=metadata, norms_plus_one=True)
    runner = ModelRunner.load(str(path), max_batch_size=2, activations="float32")
    loaded = runner.model.config
    assert loaded.rope_parameters["full_attention"] == rope["full_attention"]
    assert loaded.layer_types == config.layer_types
    assert runner.decode_kernel == "c"
    source.load_state_dict(held, strict=False)
    source.tie_weights()
    prompt = prompts()[3]
    expected = reference_greedy(source, prompt, NEW_TOKENS)
    assert runner_greedy(runner, prompt, len(expected)) == expected


@pytest.mark.parametrize(
    ("model_type", "layers", "hidden", "heads", "head_dim", "scalar"),
    [
        ("gemma2", 26, 2304, 8, 256, 256),
        ("gemma2", 46, 4608, 32, 128, 144),
        ("gemma3_text", 62, 5376, 32, 128, 168),
    ],
)
def test_gemma_query_scaling_and_soft_caps_follow_llama_cpp(
    model_type: str, layers: int, hidden: int, heads: int, head_dim: int, scalar: int
) -> None:
    """The file does not store Gemma's query scaling: llama.cpp takes 1 / sqrt(hidden / heads) for the
    27B models (told apart by their layer counts), 1 / sqrt(head_dim) otherwise; Gemma 2's soft caps
    come from the file's keys."""
    shape = {"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": heads // 2}
    config = AutoConfig.for_model(
        model_type, num_hidden_layers=layers, head_dim=head_dim, intermediate_size=64, **shape
    )
    arch = "gemma3" if model_type == "gemma3_text" else model_type
    caps = {f"{arch}.attn_logit_softcapping": 40.0, f"{arch}.final_logit_softcapping": 20.0}
    header = Header(
        arch, [], 0, {f"{arch}.attention.sliding_window": 1024} | (caps if model_type == "gemma2" else {})
    )
    completed = complete_config(config, header, np.zeros(0, dtype=np.uint8), "test.gguf")
    assert completed.query_pre_attn_scalar == scalar
    if model_type == "gemma2":
        assert (completed.attn_logit_softcapping, completed.final_logit_softcapping) == (40.0, 20.0)


def header_of(model_type: str, metadata: dict[str, Any]) -> tuple[Any, Header]:
    config = tiny(model_type, sliding_window=16).config
    arch = {"gemma3_text": "gemma3"}.get(model_type, model_type)
    return config, Header(arch, [], 0, {f"{arch}.{k}": v for k, v in metadata.items()})


def test_a_scale_factor_without_a_type_is_linear_as_llama_cpp_reads_it() -> None:
    config, header = header_of("llama", {"rope.scale_linear": 4.0})
    completed = complete_config(config, header, np.zeros(0, dtype=np.uint8), "old.gguf")
    assert completed.rope_parameters["rope_type"] == "linear"
    assert completed.rope_parameters["factor"] == 4.0


@pytest.mark.parametrize(
    ("model_type", "metadata", "refused"),
    [
        ("qwen2", {"rope.scaling.attn_factor": 1.2}, "attention factor"),  # no branch that takes it
        ("gemma3_text", {}, "no sliding window"),  # newer llama.cpp: every layer global
        ("qwen2", {"rope.dimension_count": 8}, "rope over 8"),  # a partial rope Qwen2 cannot take
    ],
)
def test_metadata_a_config_cannot_take_is_refused(
    model_type: str, metadata: dict[str, Any], refused: str
) -> None:
    config, header = header_of(model_type, metadata)
    with pytest.raises(UnsupportedModelError, match=refused):
        complete_config(config, header, np.zeros(0, dtype=np.uint8), "x.gguf")
