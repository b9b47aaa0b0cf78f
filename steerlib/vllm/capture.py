"""Pooled residuals read inside a vLLM worker: per request, the sums steerlib extracts from, kept on the device.

A request asks for capture with ``SamplingParams.extra_args["steerlib_capture"] = B`` (``CAPTURE_KEY``), ``B``
the number of its tokens that are "prompt": tokens at positions ``< B`` pool into the prompt mean, ``B - 1`` is
the last prompt token, the rest into the response mean (``steerlib.core.capture``'s three poolings, at every
layer ``0..n_layers``: 0 = the embeddings, ``L`` = block ``L - 1``'s output). The pipeline hands vLLM each
(prompt, response) as one token sequence with ``max_tokens=1``, so the tokens pooled are exactly the ones the
HF capture pools (a prefill; no decode step).

Graph-safe like the steering op (``steerlib.vllm.worker``). Every buffer is allocated once, at load:
``sums [n_layers + 1, 2 * S + 1, D]`` (per capture slot ``s``: row ``2s`` prompt sum, ``2s + 1`` response sum;
the last row is the trash row everything else adds into), ``last [n_layers + 1, S + 1, D]``, every captured
token's L2 norm ``norms [n_layers + 1, (S + 1) * max_len]`` (the HF capture's per-sample median needs them all)
and three per-token index buffers ``[max_tokens]``. ``begin()`` (host, before the forward) gives each capturing request a slot, and
computes every token's two target rows on the device from ``positions``; the op at each layer then runs the same
two in-place ``index_add_`` whatever the batch holds (a batch with no capture adds into the trash rows). Token
counts are host arithmetic on the runner's bookkeeping, never a read of the device.

A request is accumulated from its first computed token: one whose computed count restarts at 0 (a preempted
request recomputed from scratch) has its slot zeroed first. Capturing requests carry a per-request cache salt
(``steerlib.vllm.plugin``) so that no prompt token is skipped by a prefix-cache hit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

__all__ = ["CAPTURE_KEY", "CaptureBuffers", "check_boundary"]

CAPTURE_KEY = "steerlib_capture"
_MAX_STORED = 4096  # finished requests whose pooled residuals wait to be popped


def check_boundary(value: object) -> int:
    """The capture key's value (prompt tokens ``B >= 1``); raise a one-line error otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{CAPTURE_KEY} must be the number of prompt tokens (an int >= 1), got {value!r}")
    return value


class CaptureBuffers:
    """Per-slot sums of the residual stream at every layer, filled in place by the worker's op.

    Args:
        n_layers: decoder layers (positions ``0..n_layers`` are captured).
        d_model: hidden width.
        slots: requests that can capture at once (capture slots ``S``).
        max_tokens: tokens per forward pass.
        max_len: the engine's context limit (positions per request).
        device: the worker's device.
    """

    def __init__(self, n_layers: int, d_model: int, slots: int, max_tokens: int, max_len: int,
                 device: torch.device):
        self.n_positions = n_layers + 1
        self.d_model = d_model
        self.slots = slots
        self.device = device
        self.trash = 2 * slots  # sums row that non-capturing tokens add into
        self.sums = torch.zeros(self.n_positions, 2 * slots + 1, d_model, device=device)
        self.last = torch.zeros(self.n_positions, slots + 1, d_model, device=device)
        self.max_len = max_len
        self.norms = torch.zeros(self.n_positions, (slots + 1) * max_len, device=device)  # [.., slot * max_len + pos]
        self.norm_index = torch.full((max_tokens,), slots * max_len, dtype=torch.int64, device=device)
        self.sum_index = torch.full((max_tokens,), self.trash, dtype=torch.int64, device=device)
        self.last_index = torch.full((max_tokens,), slots, dtype=torch.int64, device=device)
        self._free = list(range(slots - 1, -1, -1))
        self.slot_of: dict[str, int] = {}
        self.boundary: dict[str, int] = {}
        self.counts: dict[str, list[int]] = {}  # request id -> [prompt tokens, response tokens] accumulated
        self.store: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._steps = 0

    # -- host side, before the forward -----------------------------------------------------------------
    def begin(self, runner: Any, req_ids: list[str], qsl: Tensor, row_of_token: Tensor, positions: Tensor) -> bool:
        """Assign slots and fill the per-token index buffers for this step (outside the forward); whether some
        request of the step captures."""
        self.release_missing(runner.requests)
        batch = runner.input_batch
        n = int(row_of_token.shape[0])
        slot_row = torch.full((len(req_ids) + 1,), -1, dtype=torch.int64)
        bound_row = torch.zeros(len(req_ids) + 1, dtype=torch.int64)
        any_capture = False
        for r, rid in enumerate(req_ids):
            extra = getattr(runner.requests[rid].sampling_params, "extra_args", None) or {}
            b = extra.get(CAPTURE_KEY)
            if b is None:
                continue
            b = check_boundary(b)
            count = int(qsl[r + 1] - qsl[r])
            if count <= 0:
                continue
            start = int(batch.num_computed_tokens_cpu[r])
            s = self._slot(rid, b)
            if start == 0:  # a fresh start (or a recompute after preemption): nothing accumulated yet
                self._zero(s)
                self.counts[rid] = [0, 0]
            got = self.counts[rid]
            got[0] += max(0, min(start + count, b) - start)
            got[1] += max(0, start + count - max(start, b))
            slot_row[r], bound_row[r] = s, b
            any_capture = True
        self._steps += 1
        if not any_capture:
            self.sum_index.fill_(self.trash)
            self.last_index.fill_(self.slots)
            self.norm_index.fill_(self.slots * self.max_len)
        else:
            dev = self.device
            rows = row_of_token.clamp(max=len(req_ids)).to(dev)  # padding tokens -> the last (non-capturing) row
            slot = slot_row.to(dev)[rows]  # [n]
            bound = bound_row.to(dev)[rows]
            pos = positions[:n].to(torch.int64)
            captured = slot >= 0
            sum_idx = torch.where(captured, 2 * slot + (pos >= bound).to(torch.int64), self.trash)
            last_idx = torch.where(captured & (pos == bound - 1), slot, self.slots)
            self.sum_index[:n].copy_(sum_idx)
            self.sum_index[n:].fill_(self.trash)
            self.last_index[:n].copy_(last_idx)
            self.last_index[n:].fill_(self.slots)
            trash_norm = self.slots * self.max_len
            norm_idx = torch.where(captured, slot * self.max_len + pos.clamp(0, self.max_len - 1), trash_norm)
            self.norm_index[:n].copy_(norm_idx)
            self.norm_index[n:].fill_(trash_norm)
        if self._steps % 1024 == 0:  # the trash rows only ever grow: reset them now and then
            self.sums[:, self.trash].zero_()
            self.last[:, self.slots].zero_()
        return any_capture

    def _slot(self, rid: str, boundary: int) -> int:
        s = self.slot_of.get(rid)
        if s is None:
            if not self._free:
                raise RuntimeError(f"steerlib: all {self.slots} capture slots are in use; raise "
                                   "additional_config['steerlib_capture_slots']")
            s = self._free.pop()
            self.slot_of[rid] = s
            self.boundary[rid] = boundary
            self.counts[rid] = [0, 0]
        return s

    def _zero(self, s: int) -> None:
        self.sums[:, 2 * s : 2 * s + 2].zero_()
        self.last[:, s].zero_()

    def _read(self, rid: str) -> dict[str, Any]:
        """The pooled residuals of a request from its slot (a device read: outside the forward), slot freed."""
        s = self.slot_of.pop(rid)
        b = self.boundary.pop(rid)
        n_prompt, n_resp = self.counts.pop(rid, [0, 0])
        sums = self.sums[:, 2 * s : 2 * s + 2].float().cpu()  # [n_positions, 2, D]
        total = n_prompt + n_resp
        # The HF capture's statistic: per layer, the (lower) median of the sample's single-token norms.
        norms = self.norms[:, s * self.max_len : s * self.max_len + max(total, 1)].float().cpu()
        median = norms.median(dim=1).values
        prompt_mean = sums[:, 0] / max(n_prompt, 1)
        resp = sums[:, 1] / n_resp if n_resp else torch.full_like(sums[:, 1], float("nan"))
        out = {"prompt_mean": prompt_mean, "prompt_last": self.last[:, s].float().cpu().clone(),
               "response_mean": resp, "token_norms": median, "prompt_tokens": n_prompt, "response_tokens": n_resp,
               "boundary": b}
        self._zero(s)
        self._free.append(s)
        return out

    def release_missing(self, running: Any) -> None:
        """Move the results of requests no longer running to the host store and free their slots."""
        for rid in [r for r in self.slot_of if r not in running]:
            self.store[rid] = self._read(rid)
        while len(self.store) > _MAX_STORED:
            self.store.popitem(last=False)

    # -- inside the op ---------------------------------------------------------------------------------
    def accumulate(self, layer: int, hidden: Tensor) -> None:
        """Add ``hidden`` [N, D] (the residual stream at ``layer``) into its requests' sums, in place."""
        n = hidden.shape[0]
        src = hidden if hidden.dtype == self.sums.dtype else hidden.to(self.sums.dtype)
        self.sums[layer].index_add_(0, self.sum_index[:n], src)
        self.last[layer].index_add_(0, self.last_index[:n], src)
        self.norms[layer].index_copy_(0, self.norm_index[:n], src.norm(dim=-1))

    # -- the API process's read --------------------------------------------------------------------------
    def pop(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Take the pooled residuals of these (finished) requests, by the id the client gave (vLLM appends ``-``
        and 8 characters to it)."""
        wanted = set(request_ids)
        out: dict[str, dict[str, Any]] = {}

        def client_id(key: str) -> str | None:
            return key if key in wanted else key[:-9] if len(key) > 9 and key[-9] == "-" else None

        for key in list(self.slot_of):
            ext = client_id(key)
            if ext in wanted:
                out[ext] = self._read(key)
        for key in list(self.store):
            ext = client_id(key)
            if ext in wanted:
                out[ext] = self.store.pop(key)
        return out
