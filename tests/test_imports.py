"""A third-party provider imports our provider seam first: that must work on its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    "module",
    ["providers", "providers.base", "providers.http", "linchkit_plugin.errors", "dispatcher"],
)
def test_each_public_module_imports_on_its_own(module: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)


def test_importing_the_dispatcher_does_not_load_the_http_client() -> None:
    code = "import sys, dispatcher; dispatcher.Dispatcher; print('aiohttp' in sys.modules)"
    ran = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert ran.stdout.strip() == "False"
