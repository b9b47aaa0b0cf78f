"""Steering and trait read-out inside vLLM: a general plugin and the request-side helpers.

``spec`` (the JSON a request carries in ``SamplingParams.extra_args["steerlib"]``, its cache salt) ->
``core_adapter`` (lowering and the per-step plan; the steering core's interface) -> ``worker`` (hooks, the
registered op, per-step filling from vLLM's bookkeeping, the read-out store) -> ``plugin`` (vLLM's entry point).
Importing this package does not import vLLM.
"""

from steerlib.vllm.spec import SPEC_KEY, VECTORS_ENV, cache_salt, encode_spec, parse_spec

__all__ = ["SPEC_KEY", "VECTORS_ENV", "cache_salt", "encode_spec", "parse_spec"]
