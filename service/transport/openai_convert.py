"""OpenAI's chat and completions JSON <-> engine types: a request body checked by the gRPC side's own
rules (it becomes a Start and goes through convert.start_to_request), and the completion objects and
stream chunks an answer is made of.

What a body may hold, and what happens to it:
- mapped: `messages` / `prompt`, `max_tokens` (`max_completion_tokens` wins when both are given),
  `temperature` (omitted: 1, OpenAI's default; the gRPC default is greedy), `top_p`, `stop`, `seed`,
  `logprobs` / `top_logprobs`, `stream`, `stream_options.include_usage`; vLLM's extensions `top_k`,
  `min_p`, `repetition_penalty`; `model` is echoed as the served model's name, whatever it says.
- refused (400 naming it): what this server cannot honour, so it is never silently dropped: `n` or
  `best_of` other than 1, `echo`, `suffix`, `tools` / `functions`, a `response_format` other than text,
  `logit_bias`, nonzero `frequency_penalty` / `presence_penalty`, non-text message parts.
- ignored, as OpenAI ignores fields it does not know: everything else (`user`, `metadata`, `store`, ...).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenwire.service.engine.requests import (
    Delta,
    ErrorCode,
    Failure,
    Finished,
    GenerationRequest,
    RequestError,
    StopReason,
    TokenLogprob,
)
from tokenwire.service.transport import convert
from tokenwire.v1 import tokenwire_pb2 as pb

CHAT = "chat"
COMPLETION = "completion"
# OpenAI's default max_tokens for /v1/completions; chat completions run to the context's end.
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

# How a generation's end reads as OpenAI's finish_reason. "abort" (vLLM's word) is every stop before
# the natural end: the client went away, a gRPC Cancel or Interrupt of its id, a server shutdown.
FINISH_REASONS: dict[StopReason, str] = {
    StopReason.EOS: "stop",
    StopReason.STOP_SEQUENCE: "stop",
    StopReason.MAX_TOKENS: "length",
    StopReason.CONTEXT_LENGTH: "length",
    StopReason.DEADLINE: "length",
    StopReason.CANCELLED: "abort",
    StopReason.INTERRUPTED: "abort",
    StopReason.SHUTDOWN: "abort",
    StopReason.ERROR: "abort",
}

# A refusal's HTTP status and OpenAI error type, by the engine's error code.
HTTP_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    ErrorCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    ErrorCode.NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    ErrorCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    ErrorCode.UNAVAILABLE: (503, "server_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
}


class ApiError(Exception):
    """A request answered with OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = "invalid_value",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code
        # The refusal as the gRPC side counts it (metrics): a bad parameter is INVALID_ARGUMENT.
        self.reason: ErrorCode | None = ErrorCode.INVALID_ARGUMENT if status == 400 else None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_request_error(cls, error: RequestError | Failure, params: Mapping[str, str]) -> ApiError:
        """The engine's (or convert's) refusal, naming the OpenAI parameter at fault where one is."""
        status, kind = HTTP_STATUS[error.code]
        path = convert.error_path(error)
        param = params.get(path)
        message = error.message
        if path and message.startswith(f"{path}: "):
            message = message.removeprefix(f"{path}: ")
        if param:
            message = f"{param}: {message}"
        refused = cls(message, param, status=status, type=kind, code=error.code.name.lower())
        refused.reason = error.code
        return refused


@dataclass
class ApiCall:
    """One chat or completions request, converted: what the engine runs and how the answer is shaped."""

    kind: str  # CHAT or COMPLETION
    request: GenerationRequest
    stream: bool = False
    include_usage: bool = False
    # .proto path (as convert and the engine name fields) -> the OpenAI parameter it came from
    params: dict[str, str] = field(default_factory=dict)


# ---- in ----


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _integer(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{name}: expected an integer, got {_json_type(value)}", name)
    if not low <= value <= high:
        raise ApiError(f"{name}: must be an integer in [{low}, {high}], got {value}", name)
    return value


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(f"{name}: expected a number, got {_json_type(value)}", name)
    return float(value)  # its range is convert's to check, as for a gRPC Start


def _boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(f"{name}: expected a boolean, got {_json_type(value)}", name)
    return value


def _stop(body: Mapping[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise ApiError("stop: expected a string or an array of strings", "stop")


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    """Fields this server knows but cannot honour: refused, never dropped without a word."""
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and value != 1:
            raise ApiError(f"{name}: only 1 is supported (one choice per request)", name)
    if body.get("echo"):
        raise ApiError("echo: not supported", "echo")
    if body.get("suffix"):
        raise ApiError("suffix: not supported", "suffix")
    for name in ("tools", "functions"):
        if body.get(name):
            raise ApiError(f"{name}: tool and function calls are not supported", name)
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type", "text") != "text"
    ):
        raise ApiError("response_format: only {'type': 'text'} is supported", "response_format")
    if body.get("logit_bias"):
        raise ApiError("logit_bias: not supported", "logit_bias")
    for name in ("frequency_penalty", "presence_penalty"):
        value = _number(body, name)
        if value:
            raise ApiError(f"{name}: not supported (only 0); repetition_penalty is", name)
    if body.get("stream_options") is not None and not body.get("stream"):
        raise ApiError("stream_options: only allowed when stream is true", "stream_options")


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    where = f"messages[{i}].content"
    if content is None:
        return ""  # e.g. an assistant message that only carried tool calls
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are supported", where
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(f"{where}: expected a string or an array of text parts", where)


def _messages(body: Mapping[str, Any]) -> list[pb.ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(f"messages: expected an array of messages, got {_json_type(messages)}", "messages")
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(f"messages[{i}]: expected an object", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str):
            raise ApiError(f"messages[{i}].role: expected a string", f"messages[{i}].role")
        # OpenAI's newer name for the system role; chat templates know only "system".
        role = "system" if role == "developer" else role
        converted.append(pb.ChatMessage(role=role, content=_content(message, i)))
    return converted


def _prompt(body: Mapping[str, Any], start: pb.Start) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        start.prompt = prompt
        return
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t <= UINT32_MAX for t in prompt):
            raise ApiError("prompt: token ids must be non-negative integers", "prompt")
        start.token_ids.ids.extend(prompt)
        return
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise ApiError("prompt: one prompt per request (batches are not supported)", "prompt")
    raise ApiError("prompt: expected a string or an array of token ids", "prompt")


def _parse(body: object, kind: str) -> ApiCall:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", None)
    _refuse_unsupported(body)
    start = pb.Start()
    input_param = "messages" if kind == CHAT else "prompt"
    if kind == CHAT:
        start.chat.messages.extend(_messages(body))
    else:
        _prompt(body, start)

    max_param = "max_tokens"
    max_tokens = _integer(body, "max_tokens", 1, UINT32_MAX)
    if kind == CHAT and body.get("max_completion_tokens") is not None:
        max_param = "max_completion_tokens"
        max_tokens = _integer(body, "max_completion_tokens", 1, UINT32_MAX)
    if max_tokens is None and kind == COMPLETION:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    if max_tokens is not None:
        start.stopping.max_tokens = max_tokens
    start.stopping.stop.extend(_stop(body))
    # vLLM's extensions, which benchmark clients send: exactly max_tokens, or at least min_tokens.
    start.stopping.ignore_eos = _boolean(body, "ignore_eos")
    min_tokens = _integer(body, "min_tokens", 0, UINT32_MAX)
    if min_tokens:
        start.stopping.min_tokens = min_tokens

    sampling = start.sampling
    temperature = _number(body, "temperature")
    sampling.temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    for name in ("top_p", "min_p", "repetition_penalty"):
        value = _number(body, name)
        if value is not None:
            setattr(sampling, name, value)
    top_k = _integer(body, "top_k", 0, UINT32_MAX)
    if top_k is not None:
        sampling.top_k = top_k
    seed = _integer(body, "seed", 0, UINT64_MAX)
    if seed is not None:
        sampling.seed = seed

    top_param = "top_logprobs"
    if kind == CHAT:
        start.output.logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, UINT32_MAX)
        if top and not start.output.logprobs:
            raise ApiError("top_logprobs: needs logprobs: true", "top_logprobs")
        start.output.top_logprobs = top or 0
    else:
        top_param = "logprobs"
        top = _integer(body, "logprobs", 0, UINT32_MAX)
        if top is not None:
            start.output.logprobs = True
            start.output.top_logprobs = top

    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError("stream_options: expected an object", "stream_options")
    include_usage = _boolean(options or {}, "include_usage")

    params = {
        "start.input": input_param,
        "start.prompt": input_param,
        "start.chat": input_param,
        "start.chat.messages": input_param,
        "start.token_ids.ids": input_param,
        "start.stopping.max_tokens": max_param,
        "start.stopping.stop": "stop",
        "start.stopping.min_tokens": "min_tokens",
        "start.sampling.temperature": "temperature",
        "start.sampling.top_p": "top_p",
        "start.sampling.top_k": "top_k",
        "start.sampling.min_p": "min_p",
        "start.sampling.repetition_penalty": "repetition_penalty",
        "start.sampling.seed": "seed",
        "start.output.top_logprobs": top_param,
    }
    try:
        request = convert.start_to_request(start)
    except RequestError as error:
        raise ApiError.from_request_error(error, params) from None
    return ApiCall(kind, request, stream, include_usage, params)


def chat_call(body: object) -> ApiCall:
    """A POST /v1/chat/completions body, checked and converted; raises ApiError naming the parameter."""
    return _parse(body, CHAT)


def completion_call(body: object) -> ApiCall:
    """A POST /v1/completions body, checked and converted; raises ApiError naming the parameter."""
    return _parse(body, COMPLETION)


# ---- out ----


def usage(finished: Finished) -> dict[str, Any]:
    u = finished.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }


def _chat_logprobs(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t.token, t.logprob) for t in lp.top]}
            for lp in logprobs
        ]
    }


def _completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


class Answer:
    """The OpenAI objects of one request's answer: stream chunks as outputs arrive, or the whole."""

    def __init__(self, call: ApiCall, model: str) -> None:
        self.call = call
        self.chat = call.kind == CHAT
        self.model = model
        self.created = int(time.time())
        self.id = call.request.request_id
        self.logprobs = call.request.output.logprobs
        self.text_chars = 0  # sent so far: completions' logprobs give each token's text offset

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [choice],
        }
        if self.call.include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, logprobs: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return _chat_logprobs(logprobs) if self.chat else _completion_logprobs(logprobs, offset)

    def first_chunk(self) -> dict[str, Any] | None:
        """What a chat stream opens with (the assistant's role); completions have none."""
        if not self.chat:
            return None
        return self._chunk(
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def delta_chunk(self, delta: Delta) -> dict[str, Any] | None:
        if not delta.text and not delta.logprobs:
            return None
        logprobs = self._logprobs(delta.logprobs, self.text_chars)
        self.text_chars += len(delta.text)
        if self.chat:
            choice = {
                "index": 0,
                "delta": {"content": delta.text},
                "logprobs": logprobs,
                "finish_reason": None,
            }
        else:
            choice = {"index": 0, "text": delta.text, "logprobs": logprobs, "finish_reason": None}
        return self._chunk(choice)

    def last_chunks(self, finished: Finished) -> list[dict[str, Any]]:
        """The chunk that gives finish_reason, then (with include_usage) the usage chunk."""
        reason = FINISH_REASONS[finished.reason]
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        chunks = [self._chunk(choice)]
        if self.call.include_usage:
            chunks.append({**self._chunk(None), "usage": usage(finished)})
        return chunks

    def whole(self, text: str, logprobs: list[TokenLogprob], finished: Finished) -> dict[str, Any]:
        """The non-streaming answer: one chat.completion or text_completion object."""
        reason = FINISH_REASONS[finished.reason]
        choice: dict[str, Any]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = self._logprobs(logprobs, 0)
        choice["finish_reason"] = reason
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(finished),
        }
