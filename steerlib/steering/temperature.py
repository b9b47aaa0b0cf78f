"""The one rule for tiny sampling temperatures, shared by ``steerlib.generate`` (eager and compiled) and the server.

Sampling divides the logits by the temperature: below ``MIN_TEMPERATURE``, ``logits / T`` overflows float32 for
ordinary logits (1e-40 turned a row's probabilities into inf/NaN, and torch's sampler raised). Such temperatures
mean "as good as greedy", so they are treated as greedy (0) rather than refused: callers that pass 1e-6 to ask for
near-determinism keep working and get exactly the greedy text.
"""

from __future__ import annotations

__all__ = ["MIN_TEMPERATURE", "effective_temperature", "greedy_if_tiny"]

MIN_TEMPERATURE = 1e-2


def effective_temperature(value: float) -> float:
    """0 (greedy) for a temperature in (0, ``MIN_TEMPERATURE``); any other value unchanged."""
    return 0.0 if 0.0 < value < MIN_TEMPERATURE else value


def greedy_if_tiny(generate_kwargs: dict) -> dict:
    """``generate`` arguments that sample at a tiny temperature, turned into greedy ones (others unchanged)."""
    t = generate_kwargs.get("temperature")
    if not generate_kwargs.get("do_sample") or t is None or effective_temperature(t) != 0:
        return generate_kwargs
    return {**generate_kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
