"""The worker's capture buffers on their own (no engine): a request prefilled in chunks beside one that does not
capture, a recompute after preemption, and what ``pop`` returns, against pooling the same tokens directly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from steerlib.vllm.capture import CAPTURE_KEY
from steerlib.vllm.worker import WorkerState

D, LAYERS = 8, 3


def _runner(rows: list[tuple[str, int, int, int]], extra: dict[str, dict | None]):
    """rows: (request id, prompt tokens, computed tokens before the step, tokens this step)."""
    counts = [c for *_, c in rows]
    qsl = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    batch = SimpleNamespace(num_reqs=len(rows), req_ids=[r[0] for r in rows],
                            num_computed_tokens_cpu=[r[2] for r in rows])
    requests = {rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra[rid]), num_prompt_tokens=p)
                for rid, p, *_ in rows}
    positions = torch.cat([torch.arange(start, start + n) for _, _, start, n in rows])
    return SimpleNamespace(input_batch=batch, query_start_loc=SimpleNamespace(cpu=qsl), requests=requests), positions


def _step(st: WorkerState, states: dict[str, torch.Tensor], rows, extra) -> None:
    """One forward: every token's residual at every layer is ``states[rid][layer, position]``."""
    runner, positions = _runner(rows, extra)
    st.begin(runner, positions)
    tokens = [(rid, p) for rid, _, start, n in rows for p in range(start, start + n)]
    st.capture_embeddings(torch.stack([states[rid][0, p] for rid, p in tokens]))
    for layer in range(1, LAYERS + 1):
        st.run_layer(layer, torch.stack([states[rid][layer, p] for rid, p in tokens]))
    st.end()


def test_chunks_preemption_and_pop_pool_like_the_hf_capture():
    torch.manual_seed(0)
    st = WorkerState(torch.nn.ModuleList([torch.nn.Identity() for _ in range(LAYERS)]), D, 16, torch.device("cpu"),
                     max_rows=4, capture_slots=2, max_len=32)
    states = {"a": torch.randn(LAYERS + 1, 9, D), "b": torch.randn(LAYERS + 1, 9, D)}
    extra = {"a": {CAPTURE_KEY: 5}, "b": None}
    _step(st, states, [("a", 9, 0, 4), ("b", 3, 0, 3)], extra)  # a: first chunk, b does not capture
    _step(st, states, [("b", 3, 3, 1), ("a", 9, 0, 4)], extra)  # a preempted and recomputed from 0, other row
    _step(st, states, [("a", 9, 4, 5)], extra)  # the rest: prompt tokens 4, response tokens 5..8
    got = st.capture.pop(["a"])["a"]
    tokens = states["a"]  # [layers + 1, 9, D], boundary 5
    torch.testing.assert_close(got["prompt_mean"], tokens[:, :5].mean(1))
    torch.testing.assert_close(got["prompt_last"], tokens[:, 4])
    torch.testing.assert_close(got["response_mean"], tokens[:, 5:].mean(1))
    torch.testing.assert_close(got["token_norms"], tokens.norm(dim=-1).median(dim=1).values)
    assert (got["prompt_tokens"], got["response_tokens"]) == (5, 4)
    assert st.capture.pop(["a"]) == {}  # popped once; its slot is free again
    assert not st.capture.slot_of


def test_a_bad_capture_value_is_refused_in_one_line():
    st = WorkerState(torch.nn.ModuleList([torch.nn.Identity() for _ in range(LAYERS)]), D, 16, torch.device("cpu"),
                     capture_slots=1, max_len=32)
    runner, positions = _runner([("a", 3, 0, 3)], {"a": {CAPTURE_KEY: 0}})
    with pytest.raises(ValueError, match=r"steerlib_capture must be the number of prompt tokens \(an int >= 1\), "
                                         r"got 0"):
        st.begin(runner, positions)
