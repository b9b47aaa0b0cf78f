"""Steering and trait read-out inside vLLM: a general plugin and the request-side helpers.

``slots`` (vectors registered once by content key: the store and each worker's LRU slot table) -> ``spec`` (the
JSON a request carries in ``SamplingParams.extra_args["steerlib"]``, lowered by the one steering
plan, ``steerlib.steering.plan``; its cache salt) -> ``worker`` (hooks, the registered op, the plan filled each
step from vLLM's bookkeeping, the read-out store) -> ``plugin`` (vLLM's entry point); ``layout`` (the engine
arguments steerlib starts vLLM with, ``VllmOptions``, and the layouts steering is right under, ``check_layout``);
``offline`` generates texts for the pipeline.
Importing this package does not import vLLM.
"""

from steerlib.vllm.layout import UnsupportedLayout, VllmOptions, check_layout
from steerlib.vllm.spec import SPEC_KEY, VECTORS_ENV, cache_salt, encode_spec, parse_spec, register_spec

__all__ = ["SPEC_KEY", "VECTORS_ENV", "UnsupportedLayout", "VllmOptions", "cache_salt", "check_layout",
           "encode_spec", "parse_spec", "register_spec"]
