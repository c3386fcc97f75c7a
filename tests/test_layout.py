"""The floors of service/ and the direction of their imports: transport -> engine -> model -> kernels.

grpc and protobuf only in the transport; torch (and what pulls it in) only in the model and the
kernels; the engine plain Python. A floor may import its own modules and those of floors below it;
the floors above the model may take only its plain types (model/types.py, no torch). The client
imports no part of the server and no framework integration; an integration (integrations/) imports the
client and its framework, never the server. Checked on every import statement, those inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ["transport", "engine", "model", "kernels"]  # top to bottom
SERVICE = "tokenwire.service"
GRPC = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "tokenwire.v1")
TORCH = ("torch", "transformers", "accelerate", "gguf", "safetensors", "numpy", "cffi")
HTTP = ("starlette", "uvicorn", "fastapi", "httpx", "h11")  # the HTTP front: the transport's alone
PLAIN_TYPES = (f"{SERVICE}.model.types",)  # what the floors above the model may take from it
INTEGRATIONS = "tokenwire.integrations"
FRAMEWORKS = ("pipecat", "livekit", INTEGRATIONS)  # what only integrations/ may import
CLIENT = "client"  # the pseudo floors outside service/
INTEGRATION = "integration"


def imports(path: Path) -> list[str]:
    """Every module `path` imports, as absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from tokenwire.service.kernels import ops` imports the module ops
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def floor_of(name: str) -> str | None:
    parts = name.split(".")
    return (
        parts[2] if len(parts) > 2 and parts[:2] == ["tokenwire", "service"] and parts[2] in FLOORS else None
    )


def violations(path: Path, floor: str | None) -> list[str]:
    """What `path` (a module of `floor`, of the client when None or "client", of an integration when
    "integration") imports against the rules."""
    bad = []
    for name in imports(path):
        target = floor_of(name)
        if floor is None or floor == CLIENT:
            if within(name, (SERVICE, *TORCH, *FRAMEWORKS)):
                bad.append(f"the client imports {name}")
            continue
        if floor == INTEGRATION:
            if within(name, (SERVICE, *TORCH)):
                bad.append(f"an integration imports {name}: it may use the client, never the server")
            continue
        if within(name, GRPC) and floor != "transport":
            bad.append(f"{floor} imports {name}: grpc and protobuf belong to the transport")
        if within(name, HTTP) and floor != "transport":
            bad.append(f"{floor} imports {name}: HTTP libraries belong to the transport")
        if within(name, TORCH) and floor in ("transport", "engine"):
            bad.append(f"{floor} imports {name}: torch belongs to the model and the kernels")
        if target is None:
            continue
        if FLOORS.index(target) < FLOORS.index(floor):
            bad.append(f"{floor} imports {name}, a floor above it")
        elif (
            floor in ("transport", "engine")
            and target in ("model", "kernels")
            and not within(name, PLAIN_TYPES)
        ):
            bad.append(f"{floor} imports {name}: above the model, only model/types.py (no torch)")
    return bad


def modules() -> list[tuple[Path, str | None]]:
    found: list[tuple[Path, str | None]] = [
        (p, floor) for floor in FLOORS for p in (ROOT / "service" / floor).glob("*.py")
    ]
    found.extend((p, None) for p in (ROOT / "client").glob("*.py"))
    found.extend((p, INTEGRATION) for p in (ROOT / "integrations").rglob("*.py"))
    return found


def test_every_service_module_lives_on_a_floor() -> None:
    loose = {p.name for p in (ROOT / "service").glob("*.py")} - {"__init__.py", "main.py"}
    assert not loose, f"modules outside the floors: {sorted(loose)}"
    assert all(len(list((ROOT / "service" / floor).glob("*.py"))) > 1 for floor in FLOORS)


@pytest.mark.parametrize(
    "path,floor", modules(), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else ""
)
def test_imports_point_down_the_floors(path: Path, floor: str | None) -> None:
    assert violations(path, floor) == []


def test_the_rules_catch_a_crossing(tmp_path: Path) -> None:
    module = tmp_path / "crossing.py"
    module.write_text(
        "import torch\nimport grpc\n"
        "def late():\n    from tokenwire.service.transport import servicer\n"
        "from tokenwire.service.model.runner import ModelRunner\n"
    )
    assert len(violations(module, "engine")) == 4
    assert [v.split(":")[0] for v in violations(module, "transport")] == [
        "transport imports torch",
        "transport imports tokenwire.service.model.runner.ModelRunner",
    ]
    module.write_text("import uvicorn\nfrom starlette.responses import Response\n")
    assert [v.split(":")[0] for v in violations(module, "engine")] == [
        "engine imports uvicorn",
        "engine imports starlette.responses.Response",
    ]
    assert violations(module, "transport") == []


def test_the_client_and_an_integration_keep_to_their_side(tmp_path: Path) -> None:
    module = tmp_path / "crossing.py"
    module.write_text(
        "import pipecat.frames.frames\nfrom tokenwire.client import AsyncClient\n"
        "def late():\n    from tokenwire.service.engine import engine\n"
    )
    assert [v.split(":")[0] for v in violations(module, INTEGRATION)] == [
        "an integration imports tokenwire.service.engine.engine"
    ]
    assert violations(module, CLIENT) == [
        "the client imports pipecat.frames.frames",
        "the client imports tokenwire.service.engine.engine",
    ]


def test_importing_the_client_loads_no_framework() -> None:
    code = (
        "import sys\n"
        "import tokenwire.client, tokenwire.client.cli, tokenwire.client._async, tokenwire.client._sync\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "assert not {'pipecat', 'livekit', 'torch'} & loaded, 'a framework was loaded'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_the_floors_above_the_model_load_no_torch() -> None:
    code = (
        "import sys\n"
        "import tokenwire.service.main, tokenwire.service.transport.server, tokenwire.service.engine.engine\n"
        "import tokenwire.service.engine.sessions, tokenwire.service.model.types\n"
        "assert not {'torch', 'transformers', 'numpy'} & set(sys.modules), 'torch loaded above the model'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
