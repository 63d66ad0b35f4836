"""``openapi.json`` describes what the server does: schemathesis generates requests from it (valid ones, and
ones that break it) against a real server, and every response must be no server error, carry a status code
the description lists for its route, and match the body it promises; a request that breaks the description
must be refused.

The server runs the embedded model with a 32-token context, so that no generated request asks for much
generation; the examples per route and mode are bounded, and so is every request's time."""

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode, checks
from schemathesis.specs.openapi.checks import negative_data_rejection

from helpers.servers import running_server

pytestmark = pytest.mark.slow

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
EXAMPLES = 50


@pytest.fixture(scope="module")
def api_schema():
    with running_server("--max-model-len", "32", "--max-num-seqs", "64") as (url, _):
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def operations(schema):
    found = [result.ok() for result in schema.get_all_operations()]
    assert found, "the description lists no operation"
    return found


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_responses_match_the_description(api_schema, mode):
    tested = []
    chosen = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    for operation in operations(api_schema):

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            phases=[Phase.generate],
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            case.call_and_validate(checks=chosen, timeout=60)

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            continue  # a route with nothing to break (no parameters) in negative mode
        tested.append(operation.label)
    assert any("completions" in label for label in tested), tested
