"""A request's input as the model takes it: tokenized (a session's history and a chat template
included) and checked against the vocabulary and the context, with the most tokens it may generate.

Runs on the engine's tokenizer thread (or the caller's, for `Engine.add_request`), never on the
event loop: a chat template over a long conversation takes a while.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenwire.service.engine.requests import (
    ErrorCode,
    GenerationRequest,
    RequestError,
    RequestField,
    Tokenized,
)
from tokenwire.service.engine.runner import Runner
from tokenwire.service.engine.sessions import SessionStore
from tokenwire.service.engine.wording import plural
from tokenwire.service.model.types import NotServable


class Prompts:
    """Turns requests' inputs into checked token ids for one runner (and its sessions)."""

    def __init__(self, runner: Runner, sessions: SessionStore) -> None:
        self.runner = runner
        self.sessions = sessions

    def prepare(self, request: GenerationRequest) -> tuple[list[int], int]:
        """The request's prompt token ids, checked against the model, and the most tokens it may generate."""
        ids = self._prompt_ids(request)
        return ids, self._check_tokens(request, ids)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        try:
            return self.sessions.prompt_ids(request, self.runner)
        except RequestError:
            raise
        except NotServable as error:  # the request is fine; the server was not started for it
            raise RequestError(ErrorCode.FAILED_PRECONDITION, str(error), RequestField.CHAT) from error
        except Exception as error:  # a chat template that rejects the messages, say
            field = RequestField.CHAT if request.input.chat is not None else RequestField.INPUT
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT, f"cannot tokenize the input: {error}", field
            ) from error

    def tokenize_text(self, text: str) -> Tokenized:
        ids = self.runner.encode(text)
        return Tokenized(ids, self.runner.token_texts(ids))

    def tokenize_chat(self, messages: Sequence[tuple[str, str]]) -> Tokenized:
        try:
            ids = self.runner.encode_chat(messages)
        except NotServable as error:
            raise RequestError(ErrorCode.FAILED_PRECONDITION, str(error), RequestField.CHAT) from error
        except Exception as error:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT, f"cannot apply the chat template: {error}", RequestField.CHAT
            ) from error
        return Tokenized(ids, self.runner.token_texts(ids))

    def _check_tokens(self, request: GenerationRequest, ids: list[int]) -> int:
        """Validate the prompt against the model; return the most tokens this request may generate."""
        runner = self.runner
        if not ids:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, "the input is empty", RequestField.INPUT)
        bad = next((t for t in ids if not 0 <= t < runner.vocab_size), None)
        if bad is not None:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"token id {bad} is outside the vocabulary [0, {runner.vocab_size})",
                RequestField.TOKEN_IDS,
            )
        for t in request.stopping.stop_token_ids:
            if not 0 <= t < runner.vocab_size:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"stop token id {t} is outside the vocabulary [0, {runner.vocab_size})",
                    RequestField.STOP_TOKEN_IDS,
                )
        room = runner.context_length - len(ids)
        if room < 1:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"the prompt has {plural(len(ids), 'token')}; the context holds "
                f"{plural(runner.context_length, 'token')}",
                RequestField.INPUT,
            )
        asked = request.stopping.max_tokens
        if asked is not None and asked > room:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"prompt ({plural(len(ids), 'token')}) plus max_tokens ({asked}) exceeds the context "
                f"length ({plural(runner.context_length, 'token')})",
                RequestField.MAX_TOKENS,
            )
        return asked if asked is not None else room
