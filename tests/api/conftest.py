"""The API modules' fixtures: one float32 demo server that every module without flags of its own shares
(started once), and the official client pointed at a module's ``server``. A module that needs a server with
other flags defines its own ``server`` fixture, which takes precedence; the client follows it."""

import openai
import pytest

from helpers.servers import running_server


@pytest.fixture(scope="package")
def server():
    with running_server("--dtype", "float32") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
