"""The server the API feature modules (structured outputs, tool calls, the Responses API) share: one
float32 demo server for all of them, started once, and the official client pointed at it. Modules that need
a server of their own flags define their own ``server`` fixture, which takes precedence."""

import openai
import pytest

from helpers.servers import running_server


@pytest.fixture(scope="package")
def server():
    with running_server("--dtype", "float32") as (url, _):
        yield url


@pytest.fixture(scope="package")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
