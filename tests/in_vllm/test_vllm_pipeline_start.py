"""How the pipeline's engine starts: eager below the measured crossover, compiled from it (no engine started)."""

from __future__ import annotations

import pytest

from steerlib.vllm.layout import VllmOptions
from steerlib.vllm.offline import COMPILE_FROM_TOKENS, VllmGenerator, start_mode


def test_auto_compiles_only_from_the_crossover():
    assert start_mode("auto", None) == "eager"  # unknown size, or capture only
    assert start_mode("auto", COMPILE_FROM_TOKENS - 1) == "eager"
    assert start_mode("auto", COMPILE_FROM_TOKENS) == "compiled"
    assert start_mode("compiled", 10) == "compiled"
    assert start_mode("eager", 10**9) == "eager"
    assert start_mode("auto", 10**9, eager_option=True) == "eager"


def test_bad_choices_fail_before_any_start():
    with pytest.raises(ValueError, match=r"compile must be one of \('auto', 'eager', 'compiled'\), got 'fast'"):
        VllmGenerator("unused-folder", compile="fast")
    with pytest.raises(ValueError, match="compile='compiled' contradicts enforce_eager=True"):
        VllmGenerator("unused-folder", VllmOptions(enforce_eager=True), compile="compiled")


def test_compiled_starts_on_the_cpu_build_use_a_cache_that_loads():
    """vLLM 0.32's AOT compile cache does not load back on the CPU build: steerlib's starts turn it off for the
    start (torch's inductor cache loads), unless the user chose."""
    pytest.importorskip("vllm")
    from steerlib.vllm.layout import AOT_COMPILE_ENV, is_cpu, loadable_compile_cache

    assert is_cpu()  # this environment is vLLM's CPU build
    env: dict[str, str] = {}
    with loadable_compile_cache(env) as changed:
        assert changed and env == {AOT_COMPILE_ENV: "0"}
    assert env == {}  # as it was, after the start
    env = {AOT_COMPILE_ENV: "1"}
    with loadable_compile_cache(env) as changed:
        assert not changed and env == {AOT_COMPILE_ENV: "1"}  # the user's choice wins
