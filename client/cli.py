"""The `tokenwire` command: generate, chat, info, health, tokenize and cancel against a tokenwire server.

grpc is imported only once the flags are read: its C core takes its logging settings (GRPC_VERBOSITY,
GRPC_TRACE) when it loads, and the command keeps it quiet unless --verbose, since its own one-line error
says what went wrong. So the modules that load grpc (_sync, _errors, _convert) are imported inside the
functions that use them, after `main` has set those."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message as ProtoMessage

from tokenwire.v1 import tokenwire_pb2 as pb

from ._pieces import piece_bytes, show_piece
from ._terminal import CtrlC, Spinner, summary_line
from ._types import (
    Chunk,
    Chunking,
    GenerateOptions,
    HealthStatus,
    InterruptMode,
    Message,
    ModelInfo,
    StopReason,
)

if TYPE_CHECKING:
    from ._sync import Client, Generation

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # like a shell after SIGINT

T = TypeVar("T")

EPILOG = """\
environment: TOKENWIRE_ADDRESS, TOKENWIRE_TOKEN and TOKENWIRE_CA give defaults for --address, --token
and --ca. In `generate` and `chat`, Ctrl-C interrupts the generation and prints what it had sent; a
second Ctrl-C quits at once. Exit status: 0 ok, 1 error, 130 interrupted. `tokenwire COMMAND --help`
describes a command and its flags."""

# What `chat`, and `generate` when it sends a chat message, ask for unless told otherwise (the server's
# own defaults, greedy with no penalty and no cap, let a small chat model repeat itself for pages).
CHAT_DEFAULTS: dict[str, Any] = {"temperature": 0.7, "repetition_penalty": 1.1, "max_tokens": 512}

GENERATE_DESCRIPTION = """\
Stream one generation to the terminal.

When the server's model has a chat template (`tokenwire info` says), the prompt goes as a user message
in it, as a `tokenwire chat` turn does, with the chat defaults: temperature 0.7 (the summary shows the
seed), repetition penalty 1.1, at most 512 tokens. --raw sends the prompt as plain text for the model
to continue, with the server's defaults: greedy, no penalty, up to the context length. Flags given
always win."""

CHAT_DESCRIPTION = """\
A conversation: one line of stdin per turn. The server keeps it in a session, so a turn sends only its
new line. Before the first prompt the server is checked (health, and a chat template). Defaults:
temperature 0.7 with one seed for the conversation, picked at the start and shown (--seed replays a
conversation), repetition penalty 1.1, at most 512 tokens a reply.

commands at the prompt:
  /set NAME VALUE  change a sampling or stopping setting, named as its flag: /set temperature 0.2,
                   /set max-tokens 100, /set stop TEXT (/set stop alone clears), /set ignore-eos on
  /set             show the settings
  /reset           forget the conversation (the next line starts a new session)
  /help            list these
  /bye             quit (as Ctrl-D does)
  //TEXT           send a line that starts with /
"""


# ---- arguments ----


def _connection_arguments(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Connection flags, accepted before and after the command (`tokenwire --address A info` and
    `tokenwire info --address A`). Subcommand copies default to SUPPRESS so they never overwrite a
    value given before the command."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    env = os.environ.get
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--address",
        default=default(env("TOKENWIRE_ADDRESS", "127.0.0.1:50051")),
        help="server host:port (env TOKENWIRE_ADDRESS; default 127.0.0.1:50051)",
    )
    group.add_argument(
        "--token", default=default(env("TOKENWIRE_TOKEN")), help="bearer token (env TOKENWIRE_TOKEN)"
    )
    group.add_argument(
        "--ca", default=default(env("TOKENWIRE_CA")), metavar="FILE", help="CA certificate (PEM): use TLS"
    )
    group.add_argument(
        "--tls", action="store_true", default=default(False), help="use TLS with the system CAs"
    )
    group.add_argument(
        "--client-cert", default=default(None), metavar="FILE", help="client certificate (PEM)"
    )
    group.add_argument("--client-key", default=default(None), metavar="FILE", help="client private key (PEM)")
    group.add_argument(
        "--connect-timeout",
        type=float,
        default=default(10.0),
        metavar="S",
        help="seconds to wait for a connection: to a host that does not answer, or with --wait (default 10)",
    )
    group.add_argument(
        "--wait",
        action="store_true",
        default=default(False),
        help="while the server refuses connections (it may be starting), keep trying until "
        "--connect-timeout; without it a refused connection or a bad address fails at once",
    )
    group.add_argument(
        "--timeout", type=float, default=default(None), metavar="S", help="deadline of each call, in seconds"
    )
    group.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=default(False),
        help="let gRPC's own log lines through (GRPC_VERBOSITY, GRPC_TRACE; silenced otherwise); "
        "in chat, also a summary line after every reply",
    )


def _message(text: str) -> Message:
    role, sep, content = text.partition(":")
    if not sep or not role:
        raise argparse.ArgumentTypeError(f"expected ROLE:CONTENT, got {text!r}")
    return Message(role.strip(), content.lstrip())


@dataclass(frozen=True)
class _Setting:
    """A sampling or stopping flag; in a chat, `/set NAME VALUE` changes it as well."""

    name: str  # the flag without its dashes
    dest: str  # its attribute on the parsed arguments (and its GenerateOptions key)
    type: Callable[[str], Any]
    metavar: str
    help: str
    short: str | None = None
    repeatable: bool = False  # a list: the flag may be given several times
    switch: bool = False  # on when given


_SAMPLING = (
    _Setting(
        "temperature",
        "temperature",
        float,
        "T",
        "sampling temperature; 0 is greedy (default 0.7 for a chat, 0 with generate --raw)",
        short="-t",
    ),
    _Setting("top-k", "top_k", int, "K", "sample among the K most likely tokens only (default: all)"),
    _Setting(
        "top-p",
        "top_p",
        float,
        "P",
        "nucleus sampling: among the most likely tokens that together reach probability P (default 1)",
    ),
    _Setting(
        "min-p", "min_p", float, "P", "drop tokens less likely than P times the most likely (default 0)"
    ),
    _Setting(
        "repetition-penalty",
        "repetition_penalty",
        float,
        "R",
        "penalize tokens already in the prompt or the reply; 1 is none "
        "(default 1.1 for a chat, 1 with generate --raw)",
    ),
    _Setting(
        "seed",
        "seed",
        int,
        "N",
        "seed for sampling: the same seed, settings and input give the same text "
        "(default: a random one, shown in the summary, and by chat at the start)",
    ),
)
_STOPPING = (
    _Setting(
        "max-tokens",
        "max_tokens",
        int,
        "N",
        "most tokens to generate; 0: as many as the context allows "
        "(default 512 for a chat, 0 with generate --raw)",
        short="-n",
    ),
    _Setting(
        "min-tokens",
        "min_tokens",
        int,
        "N",
        "fewest tokens before an end-of-sequence or stop token may end it (default 0)",
    ),
    _Setting("stop", "stop", str, "TEXT", "end before this text, not printed (repeatable)", repeatable=True),
    _Setting(
        "stop-token-id", "stop_token_ids", int, "ID", "end at this token id (repeatable)", repeatable=True
    ),
    _Setting(
        "ignore-eos", "ignore_eos", str, "", "go on past the model's end-of-sequence token", switch=True
    ),
    _Setting("time-limit-ms", "time_limit_ms", int, "MS", "end after this many milliseconds (default: none)"),
)
_SETTINGS = {setting.name: setting for setting in (*_SAMPLING, *_STOPPING)}


def _add_setting(group: argparse._ArgumentGroup, setting: _Setting) -> None:
    flags = [f"--{setting.name}", *([setting.short] if setting.short else [])]
    if setting.switch:
        group.add_argument(*flags, dest=setting.dest, action="store_true", default=None, help=setting.help)
    else:
        group.add_argument(
            *flags,
            dest=setting.dest,
            type=setting.type,
            metavar=setting.metavar,
            action="append" if setting.repeatable else "store",
            help=setting.help,
        )


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    sampling = parser.add_argument_group("sampling")
    for setting in _SAMPLING:
        _add_setting(sampling, setting)
    stopping = parser.add_argument_group("stopping")
    for setting in _STOPPING:
        _add_setting(stopping, setting)
    output = parser.add_argument_group("output")
    output.add_argument(
        "--chunking", choices=[c.value for c in Chunking], help="how text is cut into chunks (default token)"
    )
    output.add_argument(
        "--interrupt-mode",
        choices=[m.value for m in InterruptMode],
        default=InterruptMode.IMMEDIATE.value,
        help="what Ctrl-C asks for: stop now (default) or after the current sentence/clause",
    )
    output.add_argument(
        "--session", metavar="ID", help="session id: the server keeps the conversation under it"
    )
    output.add_argument("--quiet", "-q", action="store_true", help="no summary line on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenwire",
        description="Stream tokens from a tokenwire server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_arguments(parser, top=True)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND --help says more)"
    )

    generate = commands.add_parser(
        "generate",
        help="stream one generation to the terminal",
        description=GENERATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument(
        "prompt",
        nargs="?",
        help='the prompt ("-" reads stdin): a user message, or with --raw plain text to continue',
    )
    mode = generate.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message in the chat template "
        "(the default when the model has a chat template)",
    )
    mode.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as plain text for the model to continue: no chat template, no chat defaults",
    )
    generate.add_argument(
        "-m",
        "--message",
        action="append",
        type=_message,
        dest="messages",
        metavar="ROLE:CONTENT",
        help="a chat message (repeatable; the prompt, if any, follows as a user message)",
    )
    generate.add_argument("--system", metavar="TEXT", help="a system message first (implies --chat)")
    generate.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per server message (proto3 JSON, field names as in the .proto)",
    )
    generate.add_argument(
        "--request-id", metavar="ID", help="the request's id, to cancel it by (default: a fresh uuid)"
    )
    _generation_arguments(generate)
    _connection_arguments(generate, top=False)

    chat = commands.add_parser(
        "chat",
        help="a conversation: one line of stdin per turn",
        description=CHAT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument(
        "--system",
        metavar="TEXT",
        help="a system message for the conversation (sent with its first turn, and again after /reset)",
    )
    _generation_arguments(chat)
    _connection_arguments(chat, top=False)

    info = commands.add_parser("info", help="describe the model and the server's limits")
    info.add_argument("--json", action="store_true", help="one JSON object, field names as in the .proto")
    _connection_arguments(info, top=False)

    health = commands.add_parser("health", help="the grpc.health.v1 status (exit 0 when SERVING)")
    health.add_argument("--service", default="", help='a service name; default "" (the whole server)')
    _connection_arguments(health, top=False)

    tokenize = commands.add_parser(
        "tokenize",
        help="token ids of a text",
        description="Token ids of a text, and each token's text decoded alone; a token that holds "
        "part of a character shows its bytes, as <0xF0>.",
    )
    tokenize.add_argument("text", help="the text to tokenize")
    tokenize.add_argument(
        "--chat", action="store_true", help="as a user message, in the model's chat template"
    )
    tokenize.add_argument(
        "--json",
        action="store_true",
        help="the server's TokenizeResponse as one JSON object: token_ids, tokens (as decoded alone)",
    )
    _connection_arguments(tokenize, top=False)

    cancel = commands.add_parser("cancel", help="stop a live generation by id (exit 1 when not live)")
    cancel.add_argument(
        "request_id", metavar="ID", help="the generation's request id (generate --request-id, or --json's)"
    )
    cancel.add_argument(
        "--json",
        action="store_true",
        help="the server's CancelResponse as one JSON object: found, and the summary of a live one",
    )
    _connection_arguments(cancel, top=False)
    return parser


def _client(args: argparse.Namespace) -> Client:
    from ._sync import Client

    return Client(
        args.address,
        tls=args.tls,
        ca_file=args.ca,
        client_cert=args.client_cert,
        client_key=args.client_key,
        token=args.token,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        # A command fails at once, saying why, when nothing listens: --wait to wait for a server.
        wait_for_server=args.wait,
    )


def _use_chat_defaults(args: argparse.Namespace) -> None:
    for name, value in CHAT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _sampled(args: argparse.Namespace) -> bool:
    return bool(args.temperature)


def _options(args: argparse.Namespace) -> GenerateOptions:
    """The generation flags that were given (None for the others: the server's defaults)."""
    return GenerateOptions(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens or None,  # 0: as many as the context allows
        min_tokens=args.min_tokens,
        stop=args.stop,
        stop_token_ids=args.stop_token_ids,
        ignore_eos=args.ignore_eos,
        time_limit_ms=args.time_limit_ms,
        chunking=args.chunking,
        session_id=args.session,
        request_id=getattr(args, "request_id", None),
    )


def _say(text: str) -> None:
    """A line for the person at the terminal: on stderr, so stdout holds only generated text."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# ---- streaming a generation ----


def _follow(
    generation: Generation,
    items: Iterator[T],
    show: Callable[[T], None],
    *,
    mode: str,
    spinner: Spinner | None = None,
) -> bool:
    """Hand every item to `show` as it arrives. Ctrl-C interrupts the generation, and the loop goes on
    to show what comes until its end; a second Ctrl-C quits the process. Returns whether it was
    interrupted. `items` must survive a KeyboardInterrupt while waiting (not be a generator)."""
    from ._errors import TokenWireError

    with CtrlC() as ctrl_c:
        while True:
            try:
                item = next(items, None)
                if item is None:
                    return ctrl_c.was_pressed
                if spinner is not None:
                    spinner.stop()
                show(item)
            except KeyboardInterrupt:
                if ctrl_c.was_pressed:
                    raise
                ctrl_c.pressed()
                if spinner is not None:
                    spinner.stop()
                # Waits for the acknowledged stop. A TokenWireError means it had ended already (or the
                # stream failed): the loop goes on to show which.
                with contextlib.suppress(TokenWireError):
                    generation.interrupt(mode)


def _stream_text(
    generation: Generation, args: argparse.Namespace, out: TextIO, err: TextIO, *, summary: bool
) -> int:
    spinner = Spinner(err).start()
    last = "\n"

    def show(chunk: Chunk) -> None:
        nonlocal last
        if chunk.text:
            out.write(chunk.text)
            out.flush()
            last = chunk.text[-1]

    try:
        interrupted = _follow(generation, iter(generation), show, mode=args.interrupt_mode, spinner=spinner)
    finally:
        spinner.stop()
    if last != "\n":
        out.write("\n")
        out.flush()
    result = generation.result
    # A reply the server cut short by stopping is said even when quiet, and is not a success
    cut_short = result.reason == StopReason.SHUTDOWN
    if summary or interrupted or cut_short:
        err.write(summary_line(result, seed=result.seed if _sampled(args) else None) + "\n")
        err.flush()
    return EXIT_INTERRUPTED if interrupted else EXIT_ERROR if cut_short else EXIT_OK


def _stream_json(generation: Generation, args: argparse.Namespace, out: TextIO) -> int:
    failed = False

    def show(response: pb.GenerateResponse) -> None:
        nonlocal failed
        failed = failed or response.WhichOneof("kind") == "error"
        # Proto field names, as grpcurl prints them (and as `info --json` and friends do).
        fields = json_format.MessageToDict(response, preserving_proto_field_name=True)
        out.write(json.dumps(fields, ensure_ascii=False) + "\n")
        out.flush()

    interrupted = _follow(generation, generation.responses(), show, mode=args.interrupt_mode)
    return EXIT_ERROR if failed else EXIT_INTERRUPTED if interrupted else EXIT_OK


# ---- generate ----


def _generate(args: argparse.Namespace) -> int:
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    messages: list[Message] = list(args.messages or [])
    if args.system:
        messages.insert(0, Message("system", args.system))
    if args.raw and messages:
        raise SystemExit("tokenwire generate: --raw sends plain text, without --system or -m messages")
    if args.prompt is None and not messages:
        raise SystemExit("tokenwire generate: give a prompt, or messages with -m ROLE:CONTENT")
    with _client(args) as client:
        # Chat unless told otherwise, when the model can: an instruct model given bare text continues
        # it for a few tokens instead of answering.
        chat = args.chat or bool(messages) or (not args.raw and client.model_info().has_chat_template)
        if chat:
            _use_chat_defaults(args)
            if args.prompt is not None:
                messages.append(Message("user", args.prompt))
        options = _options(args)
        if chat:
            options["messages"] = messages
        prompt = None if chat else args.prompt
        with client.generate(prompt, **options) as generation:
            if args.json:
                return _stream_json(generation, args, sys.stdout)
            return _stream_text(generation, args, sys.stdout, sys.stderr, summary=not args.quiet)


# ---- chat ----


@dataclass
class _Conversation:
    session: str  # the server keeps the conversation under this id
    fresh: bool = True  # no turn went through yet: the system message goes with the next one


def _new_session(base: str | None) -> str:
    """A session id nobody used: `base` (--session) with a suffix, or a random one."""
    suffix = uuid.uuid4().hex
    return f"{base[:119]}-{suffix[:8]}" if base else f"chat-{suffix}"


def _read_turn(interactive: bool) -> str | None:
    """The next line of stdin; None at the end of input."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _check_server(client: Client, args: argparse.Namespace) -> ModelInfo:
    """Before the first prompt: the server answers, serves, and has a model that can chat."""
    status = client.health()
    if status != HealthStatus.SERVING:
        raise SystemExit(f"tokenwire: the server at {args.address} is not serving ({str(status).upper()})")
    info = client.model_info()
    if not info.has_chat_template:
        raise SystemExit(
            f"tokenwire: the model {info.model} has no chat template: use tokenwire generate --raw"
        )
    return info


def _chat(args: argparse.Namespace) -> int:
    # With a session id the server keeps the conversation (and its KV cache): each turn sends only
    # the new user message, and the prompt's shared prefix is not computed again.
    _use_chat_defaults(args)
    if args.seed is None and _sampled(args):
        args.seed = random.randrange(1 << 31)  # one for the conversation: --seed replays it
    conversation = _Conversation(args.session or _new_session(None))
    interactive = sys.stdin.isatty()
    with _client(args) as client:
        info = _check_server(client, args)
        if interactive:
            _say(f"{info.model} at {args.address}: {_settings_summary(args)}")
            _say("/help lists the commands; /bye or Ctrl-D quits.")
        while True:
            try:
                line = _read_turn(interactive)
            except KeyboardInterrupt:  # at the prompt, Ctrl-C leaves
                sys.stderr.write("\n")
                return EXIT_INTERRUPTED
            if line is None:
                return EXIT_OK
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if _chat_command(line, args, conversation):
                    return EXIT_OK
                continue
            _turn(client, args, conversation, line[1:] if line.startswith("//") else line, interactive)


def _turn(
    client: Client, args: argparse.Namespace, conversation: _Conversation, line: str, interactive: bool
) -> None:
    from ._errors import TokenWireError, Unauthenticated, Unavailable

    messages = [Message("user", line)]
    if conversation.fresh and args.system:
        messages.insert(0, Message("system", args.system))
    options = _options(args)
    options["messages"] = messages
    options["session_id"] = conversation.session
    try:
        with client.generate(**options) as generation:
            _stream_text(generation, args, sys.stdout, sys.stderr, summary=args.verbose)
    except TokenWireError as error:
        # A refused turn (a setting out of range, say) leaves the conversation as it was: at a
        # terminal, say why and take the next line. Piped, or with the server gone, the chat ends.
        if not interactive or isinstance(error, Unavailable | Unauthenticated):
            raise
        _say(f"tokenwire: {error.code.name}: {error}")
        return
    conversation.fresh = False


def _chat_command(line: str, args: argparse.Namespace, conversation: _Conversation) -> bool:
    """Carry out a /command; returns whether the chat should end."""
    command, _, rest = line.strip().partition(" ")
    if command == "/bye":
        return True
    if command == "/help":
        _say(CHAT_DESCRIPTION.split("commands at the prompt:\n", 1)[1])
    elif command == "/reset":
        conversation.session = _new_session(args.session)
        conversation.fresh = True
        new = f": session {conversation.session}" if args.session else ""
        _say(f"(the conversation is forgotten; a new one starts{new})")
    elif command == "/set":
        name, _, value = rest.strip().partition(" ")
        try:
            _say(_set(args, name, value.strip()) if name else _settings_table(args))
        except ValueError as error:
            _say(f"{command}: {error}")
    else:
        _say(f"unknown command {command}: /help lists them (//TEXT sends a line that starts with /)")
    return False


def _set(args: argparse.Namespace, name: str, value: str) -> str:
    """`/set NAME VALUE`: change one setting on `args` (what the next turns send); says what it is now.
    ValueError for an unknown name or a value that does not parse."""
    key = name.lstrip("-").replace("_", "-")
    setting = _SETTINGS.get(key) or next((s for s in _SETTINGS.values() if s.short == f"-{key}"), None)
    if setting is None:
        raise ValueError(f"no setting {name!r} (/set alone lists them)")
    new: Any
    if setting.switch:
        if value.lower() in ("", "on", "true", "yes", "1"):
            new = True
        elif value.lower() in ("off", "false", "no", "0"):
            new = None
        else:
            raise ValueError(f"{setting.name} takes on or off, not {value!r}")
    elif not value:
        if not setting.repeatable:
            return f"{setting.name} {_shown(getattr(args, setting.dest))}"
        new = None  # `/set stop` clears the stop strings
    else:
        try:
            converted = setting.type(value)
        except ValueError:
            kind = "an integer" if setting.type is int else "a number"
            raise ValueError(f"{setting.name} takes {kind}, not {value!r}") from None
        new = [converted] if setting.repeatable else converted
    setattr(args, setting.dest, new)
    return f"{setting.name} {_shown(new)}"


def _shown(value: Any) -> str:
    if value is None:
        return "(server default)"
    if value is True:
        return "on"
    if isinstance(value, list):
        return ", ".join(map(repr, value))
    return str(value)


def _settings_table(args: argparse.Namespace) -> str:
    width = max(map(len, _SETTINGS))
    return "\n".join(f"{name:<{width}}  {_shown(getattr(args, s.dest))}" for name, s in _SETTINGS.items())


def _settings_summary(args: argparse.Namespace) -> str:
    parts = [f"temperature {args.temperature:g}" if _sampled(args) else "greedy"]
    if _sampled(args) and args.seed is not None:
        parts.append(f"seed {args.seed}")
    if args.repetition_penalty is not None:
        parts.append(f"repetition penalty {args.repetition_penalty:g}")
    parts.append(f"at most {args.max_tokens} tokens a reply" if args.max_tokens else "no length limit")
    return ", ".join(parts)


# ---- the other commands ----


def _print_json(value: Any) -> None:
    print(json.dumps(dataclasses.asdict(value), ensure_ascii=False, default=str))


def _print_proto_json(message: ProtoMessage) -> None:
    """A server's message as it said it: proto3 JSON, field names as in the .proto, zeros included."""
    fields = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    print(json.dumps(fields, ensure_ascii=False))


def _call(client: Client, method: str, request: ProtoMessage) -> Any:
    """A unary TokenWire call, answered with the server's own message (for --json), with the client's
    connecting, retries and error mapping."""
    return client._unary(getattr(client._stub, method), request)


def _info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_info()
    if args.json:
        _print_json(info)
    else:
        fields = dataclasses.asdict(info)
        width = max(map(len, fields))
        for name, value in fields.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else value
            print(f"{name:<{width}}  {shown}")
    return EXIT_OK


def _health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(str(status).upper())
    return EXIT_OK if status == HealthStatus.SERVING else EXIT_ERROR


def _tokenize(args: argparse.Namespace) -> int:
    from ._convert import chat_to_pb

    request = (
        pb.TokenizeRequest(chat=chat_to_pb([Message("user", args.text)]))
        if args.chat
        else pb.TokenizeRequest(text=args.text)
    )
    with _client(args) as client:
        response: pb.TokenizeResponse = _call(client, "Tokenize", request)
    if args.json:
        _print_proto_json(response)
        return EXIT_OK
    # A byte token decodes alone to U+FFFD: its bytes come from lining the tokens up with the text.
    found = piece_bytes(args.text, response.tokens)
    print(f"{len(response.token_ids)} tokens")
    for index, (token_id, text) in enumerate(zip(response.token_ids, response.tokens, strict=True)):
        shown = show_piece(found[index]) if found is not None else repr(text)
        print(f"{token_id:>8}  {shown}")
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    from ._convert import cancel_result_from_pb

    with _client(args) as client:
        response: pb.CancelResponse = _call(client, "Cancel", pb.CancelRequest(request_id=args.request_id))
    result = cancel_result_from_pb(response)
    if args.json:
        _print_proto_json(response)
    elif result.summary is not None:
        print(f"cancelled {args.request_id} {summary_line(result.summary)}")
    else:
        print(f"{args.request_id}: no live request with this id")
    return EXIT_OK if result.found else EXIT_ERROR


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "generate": _generate,
    "chat": _chat,
    "info": _info,
    "health": _health,
    "tokenize": _tokenize,
    "cancel": _cancel,
}


def _quiet_grpc(verbose: bool) -> None:
    """Keep gRPC's C core from printing log lines of its own (against a plaintext server, --tls got one
    per reconnect attempt): the command's error line says what went wrong. The core reads these
    variables once, as grpc is imported, so this must come first; --verbose leaves them be."""
    if verbose or "grpc" in sys.modules:  # (imported already: called in-process, nothing to do)
        return
    os.environ["GRPC_VERBOSITY"] = "NONE"
    os.environ.pop("GRPC_TRACE", None)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_grpc(args.verbose)
    from ._errors import TokenWireError  # loads grpc: after _quiet_grpc

    try:
        return _COMMANDS[args.command](args)
    except TokenWireError as error:
        print(f"tokenwire: {error.code.name}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # before a generation was under way (e.g. while connecting)
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `tokenwire generate ... | head`: the reader left; so do we, quietly
        # Point stdout at /dev/null so the interpreter's final flush does not fail again (Python docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
