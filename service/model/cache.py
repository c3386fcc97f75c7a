"""Where tokenwire keeps what it builds once per machine: GGUF models unpacked for loading."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("TOKENWIRE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tokenwire"
    )
    return Path(base)
