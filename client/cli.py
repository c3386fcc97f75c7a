"""The `tokenwire` command: generate, chat, info, health, tokenize and cancel against a tokenwire server."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO, TypeVar

from google.protobuf import json_format

from tokenwire.v1 import tokenwire_pb2 as pb

from ._errors import TokenWireError
from ._sync import Client, Generation
from ._terminal import CtrlC, Spinner, summary_line
from ._types import Chunk, Chunking, GenerateOptions, HealthStatus, InterruptMode, Message

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # like a shell after SIGINT

T = TypeVar("T")

EPILOG = """\
environment: TOKENWIRE_ADDRESS, TOKENWIRE_TOKEN and TOKENWIRE_CA give defaults for --address, --token
and --ca. In `generate` and `chat`, Ctrl-C interrupts the generation and prints what it had sent; a
second Ctrl-C quits at once. Exit status: 0 ok, 1 error, 130 interrupted."""


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
        help="seconds to wait for the server to accept a connection (default 10)",
    )
    group.add_argument(
        "--timeout", type=float, default=default(None), metavar="S", help="deadline of each call, in seconds"
    )


def _message(text: str) -> Message:
    role, sep, content = text.partition(":")
    if not sep or not role:
        raise argparse.ArgumentTypeError(f"expected ROLE:CONTENT, got {text!r}")
    return Message(role.strip(), content.lstrip())


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", "-t", type=float, metavar="T", help="0 (default) is greedy")
    sampling.add_argument("--top-k", type=int, metavar="K")
    sampling.add_argument("--top-p", type=float, metavar="P")
    sampling.add_argument("--min-p", type=float, metavar="P")
    sampling.add_argument("--repetition-penalty", type=float, metavar="R")
    sampling.add_argument("--seed", type=int, metavar="N", help="replay a sampled generation")
    stopping = parser.add_argument_group("stopping")
    stopping.add_argument(
        "--max-tokens", "-n", type=int, metavar="N", help="default: as many as the context allows"
    )
    stopping.add_argument("--min-tokens", type=int, metavar="N")
    stopping.add_argument("--stop", action="append", metavar="TEXT", help="a stop string (repeatable)")
    stopping.add_argument("--stop-token-id", action="append", type=int, metavar="ID", dest="stop_token_ids")
    stopping.add_argument("--ignore-eos", action="store_true", default=None)
    stopping.add_argument("--time-limit-ms", type=int, metavar="MS")
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
    output.add_argument("--session", metavar="ID", help="session id: the server keeps the conversation")
    output.add_argument("--quiet", "-q", action="store_true", help="no summary line on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenwire",
        description="Stream tokens from a tokenwire server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_arguments(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="stream one generation to the terminal")
    generate.add_argument(
        "prompt", nargs="?", help='the prompt: raw text ("-" reads stdin); with --chat, a user message'
    )
    generate.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message (chat template)"
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
    generate.add_argument("--request-id", metavar="ID", help="default: a fresh uuid (to cancel it by)")
    _generation_arguments(generate)
    _connection_arguments(generate, top=False)

    chat = commands.add_parser("chat", help="a conversation: one line of stdin per turn")
    chat.add_argument("--system", metavar="TEXT", help="a system message for the conversation")
    chat.add_argument("--verbose", "-v", action="store_true", help="a summary line after every reply")
    _generation_arguments(chat)
    _connection_arguments(chat, top=False)

    info = commands.add_parser("info", help="describe the model and the server's limits")
    info.add_argument("--json", action="store_true")
    _connection_arguments(info, top=False)

    health = commands.add_parser("health", help="the grpc.health.v1 status (exit 0 when SERVING)")
    health.add_argument("--service", default="", help='a service name; default "" (the whole server)')
    _connection_arguments(health, top=False)

    tokenize = commands.add_parser("tokenize", help="token ids of a text")
    tokenize.add_argument("text")
    tokenize.add_argument("--chat", action="store_true", help="as a user message, with the chat template")
    tokenize.add_argument("--json", action="store_true")
    _connection_arguments(tokenize, top=False)

    cancel = commands.add_parser("cancel", help="stop a live generation by id (exit 1 when not live)")
    cancel.add_argument("request_id", metavar="ID")
    cancel.add_argument("--json", action="store_true")
    _connection_arguments(cancel, top=False)
    return parser


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.address,
        tls=args.tls,
        ca_file=args.ca,
        client_cert=args.client_cert,
        client_key=args.client_key,
        token=args.token,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
    )


def _options(args: argparse.Namespace) -> GenerateOptions:
    """The generation flags that were given (None for the others: the server's defaults)."""
    return GenerateOptions(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        stop=args.stop,
        stop_token_ids=args.stop_token_ids,
        ignore_eos=args.ignore_eos,
        time_limit_ms=args.time_limit_ms,
        chunking=args.chunking,
        session_id=args.session,
        request_id=getattr(args, "request_id", None),
    )


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
    if summary or interrupted:
        err.write(summary_line(result) + "\n")
        err.flush()
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


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


# ---- commands ----


def _generate(args: argparse.Namespace) -> int:
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    messages: list[Message] = list(args.messages or [])
    if args.system:
        messages.insert(0, Message("system", args.system))
    chat = args.chat or bool(messages)
    if args.prompt is None and not messages:
        raise SystemExit("tokenwire generate: give a prompt, or messages with -m ROLE:CONTENT")
    if chat and args.prompt is not None:
        messages.append(Message("user", args.prompt))
    options = _options(args)
    if chat:
        options["messages"] = messages
    with _client(args) as client:
        prompt = None if chat else args.prompt
        with client.generate(prompt, **options) as generation:
            if args.json:
                return _stream_json(generation, args, sys.stdout)
            return _stream_text(generation, args, sys.stdout, sys.stderr, summary=not args.quiet)


def _read_turn(interactive: bool) -> str | None:
    """The next line of stdin; None at the end of input."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _chat(args: argparse.Namespace) -> int:
    # With a session id the server keeps the conversation (and its KV cache): each turn sends only
    # the new user message, and the prompt's shared prefix is not computed again.
    session = args.session or f"chat-{uuid.uuid4().hex}"
    interactive = sys.stdin.isatty()
    first = True
    with _client(args) as client:
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
            messages = [Message("user", line)]
            if first and args.system:
                messages.insert(0, Message("system", args.system))
            options = _options(args)
            options["messages"] = messages
            options["session_id"] = session
            with client.generate(**options) as generation:
                _stream_text(generation, args, sys.stdout, sys.stderr, summary=args.verbose)
            first = False


def _print_json(value: Any) -> None:
    print(json.dumps(dataclasses.asdict(value), ensure_ascii=False, default=str))


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
    with _client(args) as client:
        tokens = (
            client.tokenize(messages=[Message("user", args.text)])
            if args.chat
            else client.tokenize(args.text)
        )
    if args.json:
        _print_json(tokens)
    else:
        print(f"{len(tokens)} tokens")
        for token_id, text in zip(tokens.ids, tokens.tokens, strict=True):
            print(f"{token_id:>8}  {text!r}")
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.cancel(args.request_id)
    if args.json:
        _print_json(result)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
