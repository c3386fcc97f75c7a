"""Set-up's one job beyond pyproject.toml: compile the C kernels (service/kernels/build.py says how)."""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "service" / "kernels"))
from build import build_flags  # the kernels' build script, found by path

setup(
    cffi_modules=[f"service/kernels/build.py:{name}" for name in build_flags()],
    # The builds are independent: compile them side by side.
    options={"build_ext": {"parallel": 4}},
)
