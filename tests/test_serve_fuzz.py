"""Every request, well-formed or not, gets an answer below 500 - a JSON error with a
message and a code when it is refused - and the server stays up. schemathesis generates
the requests from the app's own OpenAPI schema (valid ones, then schema-violating ones),
a bounded number per operation so the test takes about a minute."""
from __future__ import annotations

import pytest
import schemathesis  # a test dependency (installed by `make`): missing it fails, never skips
from hypothesis import HealthCheck, given, settings

from lmpatch.serve.app import create_app
from lmpatch.serve.service import Service, ServiceConfig
from tiny import tiny_model

TOKEN = "fuzz-token"
EXAMPLES = 25  # per operation and mode


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny_model("llama")
    model.model.config.max_position_embeddings = 48  # long generations are refused early (and fast)
    service = Service(model, ServiceConfig(ledger=root / "ledger", token=TOKEN))
    app = create_app(service)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    service.close()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_breaks_the_server(schema, mode):
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    failures, nothing_to_break = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=strategy)
        def run(case):
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            if response.status_code >= 500:
                failures.append((operation.label, response.status_code, response.text[:300]))
            elif response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and error["code"], response.text

        try:
            run()
        except Unsatisfiable:  # no input, or only a free-form path string, has no invalid value
            nothing_to_break.append(operation.label)
    assert not failures, failures[:5]
    assert set(nothing_to_break) <= {"GET /health", "GET /v1/models", "GET /v1/edits/{edit_id}",
                                     "GET /v1/edits/{edit_id}/patch"}, nothing_to_break
    health = schema.app  # the same app answers afterwards
    from starlette.testclient import TestClient

    assert TestClient(health).get("/health").json()["status"] == "ok"
