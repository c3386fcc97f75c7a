"""The committed generated code matches the .proto, and the package layout imports as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["tokenwire_pb2.py", "tokenwire_pb2.pyi", "tokenwire_pb2_grpc.py"]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gen_protos import generate
    finally:
        sys.path.pop(0)
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / "tokenwire" / "v1" / name).read_text()
        committed = (ROOT / "protos" / "tokenwire" / "v1" / name).read_text()
        assert fresh == committed, f"protos/tokenwire/v1/{name} is stale: run `make protos`"


def test_namespaced_imports_and_a_light_client() -> None:
    code = (
        "import sys\n"
        "from tokenwire.v1 import tokenwire_pb2, tokenwire_pb2_grpc\n"
        "import tokenwire.client\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'client pulled in torch'\n"
        "import tokenwire.service.main\n"
        "assert 'torch' not in sys.modules, 'the server module must load torch only with a model'\n"
        "assert tokenwire_pb2.DESCRIPTOR.package == 'tokenwire.v1'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_enums_start_unspecified_and_carry_their_prefix() -> None:
    from tokenwire.v1 import tokenwire_pb2

    for enum in tokenwire_pb2.DESCRIPTOR.enum_types_by_name.values():
        prefix = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper()
        assert enum.values[0].number == 0 and enum.values[0].name == f"{prefix}_UNSPECIFIED"
        assert all(v.name.startswith(prefix + "_") for v in enum.values)


def test_header_names_live_in_the_contract_once(tmp_path: Path) -> None:
    """tokenwire.v1.metadata is written by hand beside the generated modules: regenerating leaves it be,
    and the server and the client take the header names from it instead of spelling them out."""
    from tokenwire.v1 import metadata

    assert metadata.REPLICA_HEADER == "x-tokenwire-replica"
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gen_protos import generate
    finally:
        sys.path.pop(0)
    package = tmp_path / "tokenwire" / "v1"
    package.mkdir(parents=True)
    source = (ROOT / "protos" / "tokenwire" / "v1" / "metadata.py").read_text()
    (package / "metadata.py").write_text(source)
    generate(tmp_path)
    assert (package / "metadata.py").read_text() == source
    assert sorted(p.name for p in package.iterdir()) == sorted([*GENERATED, "metadata.py"])
    spelled_out = [
        str(path.relative_to(ROOT))
        for folder in ("service", "client")
        for path in (ROOT / folder).rglob("*.py")
        if f'"{metadata.REPLICA_HEADER}"' in path.read_text()
    ]
    assert spelled_out == []
