"""The service's behaviour on the Hugging Face engine: ``service_cases.ServiceCases`` over a live server.

``tests/in_vllm/test_vllm_service.py`` runs the same bodies on the vLLM engine (``.venv-vllm``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.register_assert_rewrite("service_cases")  # its asserts are the tests': report their values

from service_cases import Served, ServiceCases, server_drift, server_options, server_vectors  # noqa: E402

from steerlib.serve import BackgroundServer, create_app  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["hf"])
def served(request, embedded, optimism_vectors) -> Iterator[Served]:
    model, tok = embedded
    app = create_app(model, tok, server_vectors(optimism_vectors), server_options(), server_drift())
    with BackgroundServer(app) as srv:
        yield Served(request.param, srv.url, app.state.service, model, tok, optimism_vectors)


class TestServiceOnHf(ServiceCases):
    """Every service case on the HF engine."""
