"""``steerlib serve --engine vllm`` takes vLLM's own engine flags: parsed by the CLI, checked by ``VllmOptions``,
handed to vLLM's ``EngineArgs`` (no vLLM needed here: the engine arguments are a plain mapping)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import steerlib.serve
from steerlib import TraitVectors
from steerlib.cli import main
from steerlib.serve.process import ServeOptions
from steerlib.vllm.layout import VllmOptions, core_binding, parse_engine_arg
from steerlib.vllm.worker import IDENTITY

NGRAM = {"method": "ngram", "num_speculative_tokens": 2}


@pytest.fixture(scope="module")
def vec(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vllm_options") / "vec"
    TraitVectors({"response_mean": torch.randn(31, 576)}, "SmolLM2-135M-Instruct", "optimistic",
                 metadata={"recommended_layer": 10}).save(path)
    return str(path)


def _serve(args: list[str], monkeypatch, capsys) -> tuple[int | None, ServeOptions | None, str]:
    """Run ``steerlib serve ARGS`` with the server replaced by a recorder: (exit code, options it got, stderr)."""
    got: list[ServeOptions] = []
    monkeypatch.setattr(steerlib.serve, "serve", got.append)
    monkeypatch.setattr(sys, "argv", ["steerlib", "serve", *args])
    code = None
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    return code, (got[0] if got else None), capsys.readouterr().err


def test_vllm_flags_reach_the_engine_arguments(vec, monkeypatch, capsys):
    code, options, err = _serve(
        ["--vector", vec, "--engine", "vllm", "--tensor-parallel-size", "3", "--max-num-seqs", "8",
         "--max-model-len", "1024", "--max-num-batched-tokens", "64", "--enforce-eager",
         "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching",
         "--vllm-arg", f"speculative-config={json.dumps(NGRAM)}", "--vllm-arg", "kv_cache_dtype=auto"],
        monkeypatch, capsys)
    assert code in (None, 0), err
    assert options.vllm_args == VllmOptions(tensor_parallel_size=3, max_num_seqs=8, max_model_len=1024,
                                            max_num_batched_tokens=64, enforce_eager=True,
                                            gpu_memory_utilization=0.5, enable_prefix_caching=False,
                                            extra={"speculative_config": NGRAM, "kv_cache_dtype": "auto"})
    args = options.vllm_args.engine_args("/models/m", max_num_seqs=16)
    assert args == {"model": "/models/m", "dtype": "float32", "max_num_seqs": 8, "enforce_eager": True,
                    "enable_prefix_caching": False, "tensor_parallel_size": 3, "pipeline_parallel_size": 1,
                    "data_parallel_size": 1, "additional_config": {"steerlib": IDENTITY},
                    "worker_extension_cls": "steerlib.vllm.worker.SteerlibWorkerExtension", "max_model_len": 1024,
                    "max_num_batched_tokens": 64, "gpu_memory_utilization": 0.5,
                    "distributed_executor_backend": "mp", "speculative_config": NGRAM, "kv_cache_dtype": "auto"}


def test_old_eager_flag_still_works(vec, monkeypatch, capsys):
    code, options, err = _serve(["--vector", vec, "--engine", "vllm", "--vllm-eager"], monkeypatch, capsys)
    assert code in (None, 0), err
    assert options.vllm_args == VllmOptions(enforce_eager=True)
    # --max-batch stays vLLM's requests per step unless --max-num-seqs says otherwise
    assert options.vllm_args.engine_args("m", max_num_seqs=options.app.max_batch)["max_num_seqs"] == 16


@pytest.mark.parametrize(("args", "message"), [
    (["--tensor-parallel-size", "3"], "vLLM engine arguments (--tensor-parallel-size, --enforce-eager, --vllm-arg, "
                                      "...) need --engine vllm"),
    (["--engine", "vllm", "--tensor-parallel-size", "0"], "--tensor-parallel-size must be an integer >= 1, got 0"),
    (["--engine", "vllm", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1], got 1.5"),
    (["--engine", "vllm", "--vllm-arg", "model=/elsewhere"],
     "--vllm-arg model: steerlib sets model itself (steering needs its own value)"),
    (["--engine", "vllm", "--vllm-arg", "worker-extension-cls=x.Y"], "steerlib sets worker_extension_cls itself"),
    (["--engine", "vllm", "--vllm-arg", "enforce_eager"], "--vllm-arg 'enforce_eager': expected NAME=VALUE"),
    (["--engine", "vllm", "--vllm-arg", "max_num_seqs=-1"], "--max-num-seqs must be an integer >= 1, got -1"),
    (["--engine", "vllm", "--vllm-arg", "2x=1"], "--vllm-arg '2x': not an engine argument name"),
])
def test_bad_vllm_flags_are_one_line_errors(args, message, vec, monkeypatch, capsys):
    code, options, err = _serve(["--vector", vec, *args], monkeypatch, capsys)
    assert code == 2 and options is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_options_from_a_mapping_are_checked_when_built():
    assert ServeOptions(engine="vllm", vllm_args={"pipeline_parallel_size": 2}).vllm_args == \
        VllmOptions(pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="--pipeline-parallel-size must be an integer >= 1, got 'two'"):
        ServeOptions(engine="vllm", vllm_args={"pipeline_parallel_size": "two"})


def test_options_are_immutable():
    opts = VllmOptions(extra={"kv_cache_dtype": "auto"})
    with pytest.raises(TypeError):
        opts.extra["kv_cache_dtype"] = "fp8"  # type: ignore[index]
    # engine_args and from_engine_args are inverses (less what steerlib sets itself)
    args = {k: v for k, v in opts.engine_args("m", max_num_seqs=4).items()
            if k not in ("model", "additional_config", "worker_extension_cls")}
    assert VllmOptions.from_engine_args(args) == VllmOptions(max_num_seqs=4, extra={"kv_cache_dtype": "auto"})


@pytest.mark.parametrize(("item", "expected"), [
    ("tensor-parallel-size=3", ("tensor_parallel_size", 3)),
    ("--enable-chunked-prefill=false", ("enable_chunked_prefill", False)),
    ('speculative_config={"method": "ngram"}', ("speculative_config", {"method": "ngram"})),
    ("kv_cache_dtype=fp8", ("kv_cache_dtype", "fp8")),
    ("tokenizer_mode=", ("tokenizer_mode", "")),
])
def test_parse_engine_arg(item, expected):
    assert parse_engine_arg(item) == expected


@pytest.mark.parametrize(("world", "cpus", "expected"), [
    (3, [0, 1], "0|1|0"),  # fewer cores than workers: one core each in turn
    (2, [0, 1], "0|1"),
    (2, [4, 0, 1, 2, 3], "0,1,2|3,4"),  # contiguous groups, the first ones one larger
    (1, [0, 1], "0,1"),
])
def test_core_binding(world, cpus, expected):
    assert core_binding(world, cpus) == expected


def test_core_binding_needs_cores():
    with pytest.raises(ValueError, match=r"cannot bind 2 workers to cores \[\]"):
        core_binding(2, [])


@pytest.mark.parametrize(("args", "message"), [
    (["extract", "--trait", "optimistic", "--vllm-arg", "enforce_eager=true"],
     "vLLM engine arguments (--vllm-arg) need --engine vllm"),
    (["extract", "--trait", "optimistic", "--engine", "vllm", "--vllm-arg", "tensor_parallel_size=0"],
     "--tensor-parallel-size must be an integer >= 1, got 0"),
    (["flag", "--vector", "{vec}", "--data", "{vec}/d.jsonl", "--out", "{vec}/flag", "--baseline", "generate",
      "--engine", "vllm", "--vllm-arg", "model=x"], "--vllm-arg model: steerlib sets model itself"),
])
def test_extract_and_flag_check_vllm_args_first(args, message, vec, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["steerlib", *[a.format(vec=vec) for a in args]])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_readouts_are_merged_over_workers():
    """Pipeline parallel: only the stage holding the read-out layer has values (the others answer empty);
    tensor parallel: every rank has the same ones. Each request gets every position once."""
    from steerlib.serve.vllm_engine import merge_readouts

    stage0 = {"a": {}, "b": {}}
    stage1 = {"a": {5: [0.5], 6: [0.25]}, "b": {9: [1.0]}}
    assert merge_readouts([stage0, stage1]) == {"a": {5: [0.5], 6: [0.25]}, "b": {9: [1.0]}}
    assert merge_readouts([stage1, stage1, stage1]) == merge_readouts([stage1])
    assert merge_readouts([{"a": {"5": [0.5]}}, {"a": {6: [0.25]}}]) == {"a": {5: [0.5], 6: [0.25]}}
