"""The OpenAPI document as a contract: real response models (no empty 200 schemas, the error statuses this server
answers, no 422), and schemathesis requests generated from it against a live server answer with no 5xx and
match the documented response schemas. Bounded: a few derandomized examples per operation."""
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

EXAMPLES = 10


@pytest.fixture(scope="module")
def contract_server(make_server):
    """Answers stay short (max_tokens_cap 16, the completions default) so that generated requests run in milliseconds."""
    return make_server(max_tokens_cap=16, response_cache_size=0)


@pytest.fixture(scope="module")
def document(contract_server):
    return httpx.get(contract_server.url + "/openapi.json").json()


def test_document_has_response_models_and_real_statuses(document):
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            responses = op["responses"]
            assert "422" not in responses and {"400", "401", "413", "429", "500"} <= set(responses), path
            content = responses["200"]["content"]
            if path == "/metrics":
                assert list(content) == ["text/plain"]
            else:
                assert content["application/json"]["schema"], (method, path)
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionResponse"}
    assert "text/event-stream" in chat


def test_generated_requests_get_no_5xx_and_match_the_document(contract_server, document):
    schema = schemathesis.openapi.from_dict(document)
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10

    for op in operations:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            case.call_and_validate(base_url=contract_server.url, checks=checks)
        run()
