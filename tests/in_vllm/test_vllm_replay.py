"""Graph safety of the vLLM plugin, proven on CPU: capture the forward with an empty plan, replay it steered.

The CPU build has no CUDA graphs, so this module plays their part. A ``TorchDispatchMode`` records every op the
model's forward dispatches (tensors by identity: the addresses a graph would hold), with steerlib's ops recorded
as the kernels their bodies launched, not as Python that could decide again. A capture pass runs the batch's
shapes unsteered; then the steered batch runs with the record REPLAYED instead of the model: only what the plan's
device buffers hold (filled by the worker's ``begin()`` before each step) can steer it, as under a CUDA graph.

Shown here: replayed greedy tokens and read-outs equal the eager engine's for 16 configurations in one batch;
the record of a step does not depend on the batch's steering; every plan buffer keeps its address while
requests join and leave; no host read, cross-device copy or allocation happens inside steerlib's ops; a step
whose hook did not run fails loudly.
"""

from __future__ import annotations

import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from vllm_helpers import READOUT_LAYER, Harness, forbidden_in_step, own_core, owned_tensors, signature

from steerlib import format_prompt
from steerlib.steering.plan import Condition, lower_ops
from steerlib.steering.steer import build_ops

BUDGET = 64  # tokens per step: prompts are prefilled in chunks, so requests join over several steps
QUESTIONS = ["How do you feel about the future?", "What will next year bring for the town?"]
SYSTEM = "You are a helpful assistant for a small town library. Answer briefly and warmly."


def _configs(model, tv) -> dict[str, list]:
    """16 steering configurations: add, ablate, cap, positions, two edits at one layer, gates and a latch."""
    from steerlib.vllm.spec import UnsupportedOnVllm, encode_rows

    layers = [8, 14, 20]
    configs = {
        "add-all": build_ops(model, tv, layers, 6.0),
        "add-prompt": build_ops(model, tv, layers, 6.0, positions="prompt"),
        "add-response": build_ops(model, tv, layers, -6.0, positions="response"),
        "add-first2": [replace(op, positions="first:2") for op in build_ops(model, tv, [10], 10.0)],
        "add-window": [replace(op, positions="window:1-3") for op in build_ops(model, tv, [12], -10.0)],
        "ablate-all": build_ops(model, tv, layers, mode="ablate"),
        "ablate-response": build_ops(model, tv, [16], mode="ablate", positions="response"),
        "cap-all": build_ops(model, tv, layers, mode="cap", cap=(-1.0, 0.5)),
        "cap-prompt": build_ops(model, tv, [6, 18], mode="cap", cap=(None, 0.0), positions="prompt"),
        "two-slots": build_ops(model, tv, [12], mode="ablate") + build_ops(model, tv, [12], 5.0),
        "at-readout": build_ops(model, tv, [READOUT_LAYER], 4.0),
        "deep": build_ops(model, tv, [26, 28], 10.0),
        "early": build_ops(model, tv, [2], 12.0),
        "add-strong": build_ops(model, tv, [14], 14.0, positions="response"),
    }
    gated = build_ops(model, tv, [14], 8.0)[0]
    condition = gated.vector
    gates = {"gate": [replace(gated, when=Condition(condition, above=0.0))],
             "gate-latch": [replace(gated, coef=-8.0, when=Condition(condition, below=0.0, latch=True))]}
    try:
        encode_rows(lower_ops(gates["gate-latch"]))
        configs.update(gates)
    except UnsupportedOnVllm:  # the spec refuses conditions on vLLM: two more ungated configurations instead
        configs["cap-response"] = build_ops(model, tv, [22], mode="cap", cap=(0.0, None), positions="response")
        configs["add-mid"] = build_ops(model, tv, [15, 16], 3.0)
    assert len(configs) == 16
    return configs


def _runner(llm):
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner


@pytest.fixture(scope="module")
def harnessed(embedded, optimism_vectors, readout):
    """An in-process eager vLLM engine with the harness around its model call; runs the eager (steered) batch
    and the capture (unsteered) pass, and hands over what the replay test needs."""
    pytest.importorskip("vllm")
    from vllm import LLM, SamplingParams

    from steerlib.core.models import resolve_model_path
    from steerlib.vllm import worker
    from steerlib.vllm.spec import encode_rows

    model, tok = embedded
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the runner lives in this process
    try:
        path, _ = resolve_model_path(None)
        with own_core():
            llm = LLM(model=str(path), dtype="float32", max_model_len=512, max_num_seqs=32, enforce_eager=True,
                      enable_prefix_caching=False, max_num_batched_tokens=BUDGET, seed=0)
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    st = worker.state()
    st.configure_readout(READOUT_LAYER, readout.directions[READOUT_LAYER].tolist())
    configs = _configs(model, optimism_vectors)
    names = [*configs, "none-0", "none-1"]
    prompts = [format_prompt(tok, QUESTIONS[i % 2], system=SYSTEM) for i in range(len(names))]
    prompts[-2:] = [format_prompt(tok, q, system=SYSTEM) for q in QUESTIONS]
    lengths = [4 + i % 5 for i in range(len(names))]  # requests leave at different steps
    specs = [encode_rows(lower_ops(configs[n]), readout=True) if n in configs else None for n in names]

    def params(steered: bool):
        return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True,
                               extra_args={"steerlib": s} if steered and s else None)
                for m, s in zip(lengths, specs, strict=True)]

    # Every plan tensor's address, and the batch size, at every step.
    addresses: list[dict[str, int]] = []
    batch_sizes: list[int] = []
    begin = st.begin

    def watched_begin(runner, positions):
        begin(runner, positions)
        batch_sizes.append(runner.input_batch.num_reqs)
        addresses.append({k: t.data_ptr() for k, t in owned_tensors(st).items()})

    st.begin = watched_begin
    harness = Harness(_runner(llm).model)

    def run(steered: bool):
        st.store.clear()
        outs = llm.generate([{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in prompts],
                            params(steered), use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        values = [st.pop([o.request_id])[o.request_id] for o in outs]
        return tokens, values

    eager = run(True)
    harness.mode = "capture"
    run(False)
    yield SimpleNamespace(llm=llm, st=st, harness=harness, run=run, names=names, eager=eager,
                          addresses=addresses, batch_sizes=batch_sizes, configs=configs)
    harness.remove()
    st.begin = begin
    llm.llm_engine.engine_core.shutdown()  # the in-process engine: free its KV cache for the tests after these


def test_plan_buffers_keep_their_addresses_while_requests_join_and_leave(harnessed):
    assert len(set(harnessed.batch_sizes)) >= 3, harnessed.batch_sizes  # the batch did change
    first = harnessed.addresses[0]
    moved = sorted({k for step in harnessed.addresses for k, v in step.items() if first.get(k) != v})
    assert not moved and all(set(step) == set(first) for step in harnessed.addresses), moved


def test_no_host_read_copy_or_allocation_inside_the_step(harnessed):
    records = [*harnessed.harness.eager_records.values(), *(ops for ops, _ in harnessed.harness.captured.values())]
    inside = sum(1 for ops in records for op in ops if op[4])
    assert inside > 0  # steerlib's ops ran and were recorded
    bad = sorted({b for ops in records for b in forbidden_in_step(ops)} | set(harnessed.harness.host_reads))
    assert not bad, bad


def test_the_record_is_the_same_whatever_the_batch_steers(harnessed):
    """The steered batch (16 configurations) and the unsteered capture pass record the same ops on the same
    memory at every step size."""
    eager, captured = harnessed.harness.eager_records, harnessed.harness.captured
    assert set(eager) == set(captured) and len(eager) >= 3
    differ = [n for n in sorted(eager) if signature(eager[n]) != signature(captured[n][0])]
    assert not differ, f"step sizes whose record depends on the steering: {differ}"


def test_a_replayed_record_steers_exactly_like_the_eager_engine(harnessed):
    h = harnessed
    h.harness.mode = "replay"
    h.harness.replayed.clear()
    tokens, values = h.run(True)
    assert h.harness.replayed  # the model itself never ran
    eager_tokens, eager_values = h.eager
    mismatched = [n for n, a, b in zip(h.names, tokens, eager_tokens, strict=True) if a != b]
    assert not mismatched, mismatched
    for name, got, want in zip(h.names, values, eager_values, strict=True):
        assert sorted(got) == sorted(want), name
        torch.testing.assert_close(torch.tensor([got[p] for p in sorted(got)]),
                                   torch.tensor([want[p] for p in sorted(want)]), atol=1e-5, rtol=0)
    # Non-vacuous: most configurations change the text of their prompt.
    plain = {i % 2: eager_tokens[h.names.index(f"none-{i % 2}")] for i in range(2)}
    changed = [n for i, n in enumerate(h.names[:16]) if eager_tokens[i] != plain[i % 2][:len(eager_tokens[i])]]
    assert len(changed) >= 10, changed


def test_a_hook_that_did_not_run_fails_loudly():
    """The device stamp: a step whose steered layer never ran its op raises, with the layer named."""
    from steerlib.steering.plan import SteerOp
    from steerlib.vllm.spec import encode_spec
    from steerlib.vllm.worker import WorkerState

    d = 8
    st = WorkerState(torch.nn.ModuleList([torch.nn.Identity() for _ in range(3)]), d, 16, torch.device("cpu"))
    spec = encode_spec([SteerOp(2, torch.ones(d), coef=1.0)])
    batch = SimpleNamespace(num_reqs=1, req_ids=["a"], num_computed_tokens_cpu=[0])
    runner = SimpleNamespace(input_batch=batch, query_start_loc=SimpleNamespace(cpu=torch.tensor([0, 4])),
                             requests={"a": SimpleNamespace(sampling_params=SimpleNamespace(
                                 extra_args={"steerlib": spec}), num_prompt_tokens=4)})
    hidden = torch.ones(4, d)
    with pytest.raises(RuntimeError, match=r"steering hook at layer\(s\) \[2\] did not run exactly once"):
        st.begin(runner, torch.arange(4))
        for layer in (1, 3):
            st.run_layer(layer, hidden)
        st.end()
    hidden = torch.ones(4, d)
    st.begin(runner, torch.arange(4))
    for layer in (1, 2, 3):
        st.run_layer(layer, hidden)
    st.end()
    torch.testing.assert_close(hidden, torch.full((4, d), 2.0))  # the add at layer 2, in place
