"""The vLLM backend's registered vectors: the content-keyed slot table (LRU, pins, refusal) and the worker's use of
it (no vLLM needed: these run in the main environment)."""

from __future__ import annotations

import pytest
import torch

from steerlib.steering.plan import Condition, SteerOp, lower_ops
from steerlib.vllm.slots import SlotsExhausted, SlotTable, VectorStore, capacity_of
from steerlib.vllm.spec import encode_rows

D = 8


def _rows(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{i:024x}": torch.randn(D, generator=g) for i in range(n)}


def test_lru_evicts_only_unpinned_rows_and_refuses_when_every_slot_is_pinned():
    rows = _rows(6)
    keys = list(rows)
    written = {}
    table = SlotTable(3, load=rows.__getitem__, on_load=lambda slot, row: written.__setitem__(slot, row))
    got = table.acquire("a", keys[:2])
    assert torch.equal(got[keys[1]], rows[keys[1]]) and sorted(written) == [1, 2]
    table.acquire("b", [keys[2]])
    table.release("a")  # keys 0 and 1 stay resident, now evictable; key 0 is the least recently used
    table.acquire("c", [keys[1], keys[3]])  # key 1 is a hit (pinned again), key 3 evicts key 0
    assert keys[0] not in table and keys[1] in table and table.evictions == 1 and table.loads == 4
    assert table.slot(keys[3]) == 1  # the evicted row's slot is reused
    assert table.pinned() == 3
    with pytest.raises(SlotsExhausted, match=r"all 3 steering vector slots \(--max-steer-vectors\) are pinned by "
                                             r"running requests and this request needs 1 more"):
        table.acquire("d", [keys[4]])
    assert "d" not in table.owners and len(table) == 3  # all or nothing
    table.release_missing({"c"})  # "b" finished: its key may go
    table.acquire("d", [keys[4]])
    assert keys[2] not in table and keys[4] in table


def test_a_failed_load_changes_nothing():
    rows = _rows(2)

    def load(key):
        if key == "f" * 24:
            raise KeyError(key)
        return rows[key]

    table = SlotTable(2, load=load)
    with pytest.raises(KeyError):
        table.acquire("a", [*rows][:1] + ["f" * 24])
    assert len(table) == 0 and table.owners == [] and table.loads == 0


def test_capacity_is_read_from_the_engine_config():
    assert capacity_of(None) == 256 and capacity_of({"steerlib_max_vectors": 4}) == 4
    with pytest.raises(ValueError, match=r"--max-steer-vectors \(steerlib_max_vectors\) must be an int >= 1, got 0"):
        capacity_of({"steerlib_max_vectors": 0})


def _runner(specs: dict[str, str], prompt_lens: dict[str, int], preempted: dict[str, str] | None = None):
    """The V1 runner bookkeeping the worker reads, for requests that each decode one token (``preempted``: known
    to the runner but not in this step's batch)."""
    from types import SimpleNamespace

    ids = list(specs)
    specs = {**specs, **(preempted or {})}
    qsl = torch.arange(len(ids) + 1, dtype=torch.int32)
    requests = {rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"steerlib": specs[rid]}),
                                     num_prompt_tokens=prompt_lens[rid]) for rid in specs}
    return SimpleNamespace(input_batch=SimpleNamespace(num_reqs=len(ids), req_ids=ids),
                           query_start_loc=SimpleNamespace(cpu=qsl), requests=requests)


def _step(st, runner, positions):
    st.begin(runner, torch.tensor(positions))
    h = torch.zeros(len(positions), D)
    h[:, 0] = 1.0  # every token projects 1.0 on the condition direction e0
    for layer in range(1, st.n_layers + 1):
        st.run_layer(layer, h)
    st.end()
    return h


def test_worker_pins_a_requests_vectors_while_it_runs_and_carries_latches_across_batch_changes(tmp_path):
    from steerlib.vllm import worker

    store = VectorStore(tmp_path)
    e0 = torch.eye(D)[0]
    push = torch.eye(D)[1]
    latched = lower_ops([SteerOp(layer=1, vector=push, coef=2.0, positions="response",
                                 when=Condition(e0, above=0.5, latch=True))])
    plain = lower_ops([SteerOp(layer=2, vector=torch.eye(D)[2], coef=1.0)])
    spec_a, spec_b = encode_rows(latched, store=store), encode_rows(plain, store=store)
    layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(2)])
    st = worker.WorkerState(layers, D, max_tokens=8, device=torch.device("cpu"),
                            slots=SlotTable(3, load=VectorStore(tmp_path).get))
    # Step 1: request a alone, first response token: the gate opens (projection 1.0 >= 0.5) and latches.
    h = _step(st, _runner({"a": spec_a}, {"a": 3}), [3])
    assert float(h[0, 1]) == 2.0
    assert st.slots.pinned() == 2 and st.slots.loads == 2  # the edit's row and its gate direction
    # Step 2: request b joins (the batch's rows change); a's latch holds although its token no longer passes.
    st.begin(_runner({"b": spec_b, "a": spec_a}, {"a": 3, "b": 2}), torch.tensor([2, 4]))
    h = torch.zeros(2, D)  # projection 0 on e0: only a latched gate lets the edit through
    for layer in (1, 2):
        st.run_layer(layer, h)
    st.end()
    assert float(h[1, 1]) == 2.0 and float(h[0, 1]) == 0.0 and float(h[0, 2]) == 1.0
    assert st.slots.pinned() == 3
    # a is preempted for a step (out of the batch, still running) and resumes: its latch still holds.
    _step(st, _runner({"b": spec_b}, {"a": 3, "b": 2}, preempted={"a": spec_a}), [3])
    assert st.slots.pinned() == 3  # a's rows stay pinned while it waits
    st.begin(_runner({"a": spec_a, "b": spec_b}, {"a": 3, "b": 2}), torch.tensor([5, 4]))
    h = torch.zeros(2, D)
    for layer in (1, 2):
        st.run_layer(layer, h)
    st.end()
    assert float(h[0, 1]) == 2.0
    # Step 3: a finished (gone from the runner's requests) and c arrives with a new vector: a's rows are unpinned
    # and the least recently used one makes room.
    spec_c = encode_rows(lower_ops([SteerOp(layer=2, vector=torch.eye(D)[3], coef=1.0)]), store=store)
    h = _step(st, _runner({"b": spec_b, "c": spec_c}, {"b": 2, "c": 2}), [3, 2])
    assert float(h[1, 3]) == 1.0 and float(h[0, 2]) == 1.0
    assert st.slots.pinned() == 2 and st.slots.evictions == 1 and latched[0].key not in st.slots
