"""The steered, monitored chat server: many users, each with their own steering, in one continuous batch.

``schema`` (request models and validation) -> ``contract`` (what the service asks of an engine: the protocol
and the values it hands back) -> ``detok`` (text, finish and read-out pairing of a reply) -> ``engine`` (continuous batching with per-row steering) ->
``registry`` (named vectors), ``conversations`` (per-turn series), ``metrics`` (Prometheus) -> ``service``
(engine, tokenizer, steering resolution, drift) -> ``runs`` (one request's rows) -> ``openai_routes`` /
``ollama_routes`` (routers) -> ``guard`` (Host, key, body limit, CORS) -> ``app`` (``create_app``: routers,
operations routes, error shapes) -> ``process`` (options, uvicorn).
"""

from steerlib.serve.app import AppOptions, Service, create_app
from steerlib.serve.contract import EngineCapabilities, FinishedRequest, ServingEngine
from steerlib.serve.engine import Completion, Engine, Sampling
from steerlib.serve.process import (
    API_KEY_ENV,
    BackgroundServer,
    ServeOptions,
    default_steering_specs,
    named_vectors,
    serve,
)
from steerlib.serve.schema import ApiError, ChatCompletionRequest, SteeringSpec

__all__ = [
    "API_KEY_ENV",
    "ApiError",
    "AppOptions",
    "BackgroundServer",
    "ChatCompletionRequest",
    "Completion",
    "Engine",
    "EngineCapabilities",
    "FinishedRequest",
    "Sampling",
    "ServeOptions",
    "ServingEngine",
    "Service",
    "SteeringSpec",
    "create_app",
    "default_steering_specs",
    "named_vectors",
    "serve",
]
