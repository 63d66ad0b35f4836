"""The API modules' server: one float32 demo server that every module without flags of its own shares
(started once; the ``client`` fixture of tests/conftest.py points at it). A module that needs a server with
other flags defines its own ``server`` fixture, which takes precedence."""

import pytest

from helpers.servers import running_server


@pytest.fixture(scope="package")
def server():
    with running_server("--dtype", "float32") as (url, _):
        yield url
