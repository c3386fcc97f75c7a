"""tokenwire for Pipecat pipelines: an LLM service with acknowledged barge-in, sentence frames and sessions.

    pip install "tokenwire[pipecat]"

    from tokenwire.integrations.pipecat import TokenWireLLMService

    llm = TokenWireLLMService(address="127.0.0.1:50051", chunking="sentence", use_session=True)

It goes where Pipecat's OpenAILLMService would (see `TokenWireLLMService`). Importing this package
imports pipecat; `tokenwire.client` never does.
"""

from __future__ import annotations

from ._conversation import chat_turns, heard_prefix
from ._llm import InterruptStats, TokenWireLLMService

__all__ = ["InterruptStats", "TokenWireLLMService", "chat_turns", "heard_prefix"]
