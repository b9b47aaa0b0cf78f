"""The steered, monitored chat server: many users, each with their own steering, in one continuous batch.

``schema`` (request models and validation) -> ``engine`` (continuous batching with per-row steering) ->
``registry`` (named vectors) -> ``service`` (engine, tokenizer, steering resolution, drift) -> ``runs`` (one
request's rows) -> ``openai_routes`` / ``ollama_routes`` (routers) -> ``guard`` (Host, key, body limit, CORS) ->
``app`` (``create_app``: routers, operations routes, error shapes) -> ``process`` (options, uvicorn).
"""

from steerlib.serve.app import AppOptions, Service, create_app
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
    "Sampling",
    "ServeOptions",
    "Service",
    "SteeringSpec",
    "create_app",
    "default_steering_specs",
    "named_vectors",
    "serve",
]
