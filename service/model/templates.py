"""Chat templates: the model's own (GGUF metadata or the folder's tokenizer config), or one named or
given as a file with --chat-template, and the refusal that names the flag when there is none."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from tokenwire.service.model.types import NotServable

log = logging.getLogger("tokenwire.model")

_FOLDER = "chat_templates"
# The families' own templates, as their tokenizer configs carry them (each file cites its source).
NAMES = ("chatml", "gemma", "llama3", "mistral", "phi3")
# Each family's end-of-turn token: a reply ends there, as llama.cpp ends it ("end of generation").
_END_OF_TURN = {
    "chatml": "<|im_end|>",
    "gemma": "<end_of_turn>",
    "llama3": "<|eot_id|>",
    "phi3": "<|end|>",
}


class ChatTemplateError(ValueError):
    """A --chat-template that names nothing usable (at start), or a chat without a template."""


class NoChatTemplate(ChatTemplateError, NotServable):
    """A chat request to a model without a template: the server's start decides, not the request."""


def no_template_message() -> str:
    return (
        "the model has no chat template: start the server with --chat-template FILE (a Jinja file) "
        f"or one of {', '.join(NAMES)}"
    )


def read_template(spec: str) -> str:
    """The Jinja text of a family's name (see NAMES) or of a file."""
    if spec in NAMES:
        return (resources.files(__package__) / _FOLDER / f"{spec}.jinja").read_text(encoding="utf-8")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ChatTemplateError(f"--chat-template {spec!r} is neither a file nor one of {', '.join(NAMES)}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ChatTemplateError(f"--chat-template {spec!r} is empty")
    return text


def use_chat_template(tokenizer: Any, spec: str | None) -> list[int]:
    """Give the tokenizer the template `spec` names (None: keep the model's own, if any), log which
    one is used, and return the end-of-turn token ids that should end a reply as EOS does: the
    family's end-of-turn token when the template uses it and the vocabulary has it as one token."""
    own = getattr(tokenizer, "chat_template", None)
    if spec is None:
        log.info("chat template: %s", "the model's own" if own else "none (" + no_template_message() + ")")
        return []
    text = read_template(spec)
    _check_syntax(text, spec)
    tokenizer.chat_template = text
    log.info(
        "chat template: %s (--chat-template)%s",
        spec,
        ", in place of the model's own" if own else "",
    )
    return end_of_turn_ids(tokenizer, text)


def end_of_turn_ids(tokenizer: Any, template: str) -> list[int]:
    """The end-of-turn tokens `template` writes, which the vocabulary holds as single tokens."""
    ids = []
    for marker in sorted(set(_END_OF_TURN.values())):
        if marker not in template:
            continue
        encoded = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(encoded, int) and encoded != getattr(tokenizer, "unk_token_id", None):
            ids.append(encoded)
    return ids


def _check_syntax(text: str, spec: str) -> None:
    """Refuse a template Jinja cannot parse at start, not at the first chat request: compiled as
    transformers compiles it for apply_chat_template (its extensions, e.g. {% generation %})."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"--chat-template {spec!r}: line {error.lineno}: {error.message}") from error
