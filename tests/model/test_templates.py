"""Chat templates: the model's own, one named or given as a file (--chat-template), each rendering as
the family's own tokenizer config does, and a refusal that names the flag when there is none."""

# ruff: noqa: E501 -- the upstream templates below stay as their configs write them, in long pieces

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.models import tiny_model, tokenizer
from tokenwire.service.model.runner import ModelRunner
from tokenwire.service.model.templates import (
    NAMES,
    ChatTemplateError,
    end_of_turn_ids,
    read_template,
    use_chat_template,
)

# The families' templates as their tokenizer configs carry them ("chat_template"), copied here as
# the reference the package's files must render exactly like.
UPSTREAM = {
    # transformers' chat-templating guide (ChatML)
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.2
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif "
        "message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
        "user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # microsoft/Phi-3.5-mini-instruct
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] "
        "+ '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + "
        "'<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
        "{{ eos_token }}{% endif %}"
    ),
    # google/gemma-3-270m-it
    "gemma": (
        "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string "
        "-%}\n        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- else -%}\n        "
        "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n    {%- endif -%}\n    "
        '{%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = "" -%}\n    '
        "{%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    "
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation "
        'roles must alternate user/assistant/user/assistant/...") }}\n    {%- endif -%}\n    {%- if '
        "(message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        "
        "{%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\\n' + "
        "(first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        "
        "{{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in "
        "message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                "
        "{{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                "
        "{{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        "
        "{{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\\n' }}\n"
        "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\\n'}}\n{%- endif -%}\n"
    ),
}

CHAT = [
    ("system", "Answer briefly."),
    ("user", "  What is the capital of France? "),
    ("assistant", "Paris."),
    ("user", "And of Italy?"),
]
ALTERNATING = CHAT[1:]  # Mistral's template takes no system message


def _bare_tokenizer() -> object:
    """The default model's tokenizer without its chat template: a model that has none."""
    bare = copy.deepcopy(tokenizer())
    bare.chat_template = None
    return bare


def _runner(tok: object) -> ModelRunner:
    return ModelRunner(tiny_model(), tok, name="tiny", source="test", max_batch_size=1, max_context=128)


def _expected(tok: object, template: str, messages: list[tuple[str, str]]) -> list[int]:
    rendered = tok.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": r, "content": c} for r, c in messages],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )
    return list(tok(rendered, add_special_tokens=False).input_ids)  # type: ignore[operator]


def test_a_model_without_a_template_refuses_chat_naming_the_flag() -> None:
    runner = _runner(_bare_tokenizer())
    assert not runner.has_chat_template
    with pytest.raises(ChatTemplateError) as refused:
        runner.encode_chat([("user", "Hello")])
    message = str(refused.value)
    assert message.startswith("the model has no chat template: start the server with --chat-template FILE")
    assert all(name in message for name in NAMES)
    assert runner.encode("Hello")  # plain prompts still work


def test_the_models_own_template_is_kept_without_the_flag() -> None:
    tok = copy.deepcopy(tokenizer())
    own = tok.chat_template
    assert own and use_chat_template(tok, None) == []
    runner = _runner(tok)
    assert runner.has_chat_template and tok.chat_template == own
    assert runner.encode_chat(CHAT) == _expected(tok, own, CHAT)


@pytest.mark.parametrize("name", NAMES)
def test_a_named_template_renders_as_the_familys_own(name: str) -> None:
    tok = _bare_tokenizer()
    use_chat_template(tok, name)
    runner = _runner(tok)
    assert runner.has_chat_template
    messages = ALTERNATING if name == "mistral" else CHAT
    assert runner.encode_chat(messages) == _expected(tok, UPSTREAM[name], messages)
    # and the text itself, without tokenizing: one character off would show here
    text = read_template(name)
    kwargs = {"tokenize": False, "add_generation_prompt": True}
    chat = [{"role": r, "content": c} for r, c in messages]
    assert tok.apply_chat_template(chat, chat_template=text, **kwargs) == tok.apply_chat_template(
        chat, chat_template=UPSTREAM[name], **kwargs
    )


def test_a_template_file_is_used_in_place_of_the_models_own(tmp_path: Path) -> None:
    path = tmp_path / "turns.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    tok = copy.deepcopy(tokenizer())
    assert use_chat_template(tok, str(path)) == []  # no end-of-turn token of a family in it
    runner = _runner(tok)
    assert runner.encode_chat(ALTERNATING) == _expected(tok, path.read_text(), ALTERNATING)
    assert tok.decode(runner.encode_chat([("user", "Hi")])) == "[user] Hi\n[assistant] "


def test_a_template_name_or_file_that_cannot_be_used_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="neither a file nor one of chatml, gemma"):
        use_chat_template(_bare_tokenizer(), "vicuna")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ChatTemplateError, match=r"broken\.jinja"):
        use_chat_template(_bare_tokenizer(), str(broken))


def test_a_named_template_ends_replies_at_its_end_of_turn_token() -> None:
    tok = _bare_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert use_chat_template(tok, "chatml") == [im_end]
    assert end_of_turn_ids(tok, read_template("gemma")) == []  # not in this vocabulary
