"""Every example in examples/ runs against a real server (the fake model) and does what it says."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from tests.conftest import wait_until_idle
from tests.fake_runner import FakeRunner, token_id
from tokenwire.service.transport.server import RunningServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def run(*args: str | Path, timeout: float = 60.0, **env: str) -> str:
    """Run an example to its end (without blocking the server's event loop); returns its stdout."""
    process = await asyncio.create_subprocess_exec(
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def idle(server: RunningServer) -> None:
    assert server.engine is not None
    await wait_until_idle(server.engine)


async def test_stubs_direct(served: RunningServer) -> None:
    out = await run(sys.executable, EXAMPLES / "stubs_direct.py", served.address)
    assert out.startswith("model: fake (context 256 tokens, batch 4)\n")
    assert "story: STOP_REASON_INTERRUPTED, " in out and "haiku: STOP_REASON_MAX_TOKENS, 24 tokens" in out
    assert out.endswith("stream: StatusCode.OK\n")
    await idle(served)


async def test_voice_pipeline(served: RunningServer) -> None:
    # Chat prompts start with BOS: script what the fake model says to any of them, in sentences.
    runner = served.engine.runner if served.engine else None
    assert isinstance(runner, FakeRunner)
    sentences = "Ġhello Ġworld . ĠDr ĠSmith Ġsat . ĠDr ĠSmith Ġsat Ġon Ġthe Ġmat ."
    runner.script[runner.bos_token_id] = [token_id(w) for w in sentences.split()] * 10
    out = await run(sys.executable, EXAMPLES / "voice_pipeline.py", served.address, "2")
    lines = out.splitlines()
    assert lines[1:4] == ["speak: hello world.", "speak: Dr Smith sat.", "barge-in: the user started talking"]
    assert "stopped: interrupted after " in out
    assert "heard: 'hello world. Dr Smith sat.'" in lines
    counts = re.search(r"^sent: (\d+) characters, spoken: (\d+)$", out, re.MULTILINE)
    assert counts is not None
    sent, spoken = map(int, counts.groups())
    assert spoken == len(" hello world. Dr Smith sat.") <= sent
    # Only whole sentences are spoken: the follow-up's 40 tokens end mid-sentence, and that half
    # sentence is reported instead of spoken.
    assert all(line.endswith(".") for line in lines if line.startswith("speak: ")), out
    assert "not spoken (max_tokens, mid-sentence): " in out
    cached = next(line for line in lines if line.startswith("cached prompt tokens: "))
    assert int(cached.split()[3]) > 0  # the second turn reused the session's KV cache
    await idle(served)


async def test_grpcurl_session(served: RunningServer) -> None:
    grpcurl = Path(sys.executable).parent / "grpcurl"
    out = await run("bash", EXAMPLES / "grpcurl_session.sh", served.address, GRPCURL=str(grpcurl))
    assert "tokenwire.v1.TokenWire\n" in out and "rpc Generate ( stream" in out
    assert '"started": {' in out and '"chunk": {' in out and '"reason": "STOP_REASON_MAX_TOKENS"' in out
    assert '"model": "fake"' in out and '"status": "SERVING"' in out
    # Echoed commands paste into a shell: JSON arguments are quoted, documentation comes from the .proto.
    assert f'$ grpcurl -plaintext -d \'{{"text": "Hello, world"}}\' {served.address} ' in out
    assert "tokenwire.v1.Interrupt is a message:\n// " in out
    await idle(served)


async def test_pipecat_bot(served: RunningServer) -> None:
    # One sentence, then one that runs on: the barge-in (an empty line) comes while it is generated.
    runner = served.engine.runner if served.engine else None
    assert isinstance(runner, FakeRunner)
    runner.step_delay = 0.02
    script = "Ġhello Ġworld . ĠDr ĠSmith Ġsat" + " Ġon Ġthe Ġmat" * 60
    runner.script[runner.bos_token_id] = [token_id(w) for w in script.split()]
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "pipecat_bot.py"), served.address,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None

    async def line() -> str:
        return (await asyncio.wait_for(process.stdout.readline(), 30)).decode().rstrip("\n")  # type: ignore[union-attr]

    try:
        assert (await line()).startswith("type a line to talk")
        process.stdin.write(b"hello the cat\n")
        assert await line() == "bot: hello world."
        process.stdin.write(b"\n")  # barge in
        assert await line() == "(barge-in)"
        stopped = await line()
        assert re.fullmatch(
            r"\(interrupted: the server stopped with interrupted in [\d.]+ ms;"
            r" 13 characters sent, 13 shown\)",
            stopped,
        ), stopped
        process.stdin.write(b"the mat\n")  # the next turn, in the same session
        assert await line() == "bot: hello world."
        process.stdin.close()  # Ctrl-D: the reply runs to its end (the script's), then the bot quits
        rest = (await asyncio.wait_for(process.stdout.read(), 30)).decode()
        done = re.search(r"^\(done: eos, \d+ tokens, (\d+) of (\d+) prompt tokens cached\)$", rest, re.M)
        assert done is not None and int(done.group(1)) > 0, rest
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    await idle(served)
