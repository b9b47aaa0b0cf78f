"""The service's behaviour on the vLLM engine: the same ``service_cases.ServiceCases`` bodies the main suite runs on
the HF engine (tests/test_service_engines.py), over a live ``steerlib serve`` app on the session's engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("service_cases")  # its asserts are the tests': report their values

from service_cases import (  # noqa: E402
    READOUT_LAYER,
    Served,
    ServiceCases,
    server_drift,
    server_options,
    server_vectors,
)
from vllm_helpers import READOUT_LAYER as ENGINE_READOUT_LAYER  # noqa: E402
from vllm_helpers import LentEngine  # noqa: E402

from steerlib.serve import BackgroundServer, create_app  # noqa: E402


@pytest.fixture(scope="module", params=["vllm"])
def served(request, vllm_engine, embedded, optimism_vectors) -> Iterator[Served]:
    assert READOUT_LAYER == ENGINE_READOUT_LAYER  # the server's read-out is the session engine's
    model, tok = embedded
    app = create_app(model, tok, server_vectors(optimism_vectors), server_options(), server_drift(),
                     engine_factory=lambda **kw: LentEngine(vllm_engine))
    with BackgroundServer(app) as srv:
        yield Served(request.param, srv.url, app.state.service, model, tok, optimism_vectors)


class TestServiceOnVllm(ServiceCases):
    """Every service case on the vLLM engine."""
