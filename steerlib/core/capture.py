"""Batched capture of residual-stream activations, pooled per sample.

``capture_activations`` tokenises (prompt, response) pairs, runs them through one of three backends and
pools per sample; ``steerlib.core.hooks.record_residual`` is the hook-level primitive underneath.

Layer ``L``: 0 = embeddings, ``L`` = output of block ``L - 1``, the last one before the final norm (defined in
``steerlib.core.hooks``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from steerlib.core.arch import get_layout
from steerlib.core.backends import BACKENDS, run_backend
from steerlib.core.hooks import check_layers, record_residual
from steerlib.core.models import unwrap_model

__all__ = ["POOLINGS", "Activations", "activations_from_hidden", "activations_from_pooled", "capture_encoded", "encode_samples", "capture_activations", "pad_batch", "pad_token_id", "pooled_activations", "record_residual",
           "tokenize_pairs"]

POOLINGS = ("prompt_mean", "prompt_last", "response_mean")


@dataclass
class Activations:
    """Pooled activations of N samples at the chosen layers.

    ``pooled[kind]`` has shape [N, len(layers), d_model] for kind in ``POOLINGS``; ``response_mean`` is NaN
    for samples without a response. ``tokens`` (when requested) holds per sample a tensor
    [len(layers), seq_i, d_model] over prompt + response tokens, with ``prompt_lengths[i]`` prompt tokens.
    """

    layers: list[int]
    pooled: dict[str, Tensor]
    prompt_lengths: list[int]
    response_lengths: list[int]
    # [N, len(layers)]: median L2 norm of single-token activations. Median, because a few tokens (the first
    # one above all) carry norms 10-100x the rest in many models and would swamp a mean.
    token_norms: Tensor | None = None
    tokens: list[Tensor] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def at(self, kind: str, layer: int) -> Tensor:
        """[N, d_model] activations of one pooling at one layer."""
        if kind not in self.pooled:
            raise ValueError(f"unknown pooling {kind!r}; choose from {POOLINGS}")
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not captured; captured layers: {self.layers}")
        return self.pooled[kind][:, self.layers.index(layer)]


def _check_samples(prompts: Sequence[str], responses: Sequence[str | None] | None) -> list[str | None]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not a single string")
    if len(prompts) == 0:
        raise ValueError("empty prompt list: nothing to capture")
    if responses is None:
        responses = [None] * len(prompts)
    if len(responses) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} must be a string, got {type(p).__name__}")
        if not p:
            raise ValueError(f"prompt {i} is empty: a response needs a prompt before it")
        if r is not None and not isinstance(r, str):
            raise ValueError(f"response {i} must be a string or None, got {type(r).__name__}")
    return list(responses)


def tokenize_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str | None]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + response, tokenised apart so the boundary is exact; returns (ids, prompt_len)."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r, add_special_tokens=False)["input_ids"] if r else []
        if not p_ids:
            raise ValueError(f"prompt {p!r} tokenises to nothing")
        out.append((list(p_ids) + list(r_ids), len(p_ids)))
    return out


def encode_samples(tokenizer, prompts: Sequence[str], responses: Sequence[str | None] | None,
                   require_response: bool = False) -> list[tuple[list[int], int]]:
    """Checked (prompt, response) pairs tokenised by ``tokenize_pairs``, for an engine that captures elsewhere
    (vLLM, a server); ``require_response``: a response that tokenises to nothing is an error."""
    encoded = tokenize_pairs(tokenizer, prompts, _check_samples(prompts, responses))
    if require_response:
        for i, (ids, p_len) in enumerate(encoded):
            if len(ids) == p_len:
                raise ValueError(f"response {i} tokenises to nothing: there is no response token to average")
    return encoded


def context_length(model: nn.Module) -> int | None:
    """How many positions the model was built for (``max_position_embeddings`` or its GPT-2 name), if known."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: nn.Module, lengths: Sequence[int], names: Sequence[str], extra: int = 0) -> None:
    """Raise naming the first sequence whose ``length + extra`` tokens exceed the model's context.

    Args:
        model: the model the tokens are for.
        lengths: token counts.
        names: how each sequence is named in the error (e.g. "prompt 3", "train.jsonl line 7").
        extra: tokens still to come (``max_new_tokens`` when generating).
    """
    limit = context_length(model)
    if limit is None:
        return
    for n, name in zip(lengths, names, strict=True):
        if n + extra > limit:
            more = f" + {extra} new tokens" if extra else ""
            raise ValueError(f"{name} is {n} tokens{more}, more than the model's context of {limit} tokens; "
                             "shorten it")


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0 (masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(getattr(tokenizer, "eos_token_id", None) or 0)


def pad_batch(
    sequences: Sequence[list[int]], pad_id: int, side: str = "left"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad to a [B, T] batch. Returns input_ids, attention_mask, position_ids and each row's offset.

    Position ids count real tokens only, so a left-padded row sees the same positions as an unpadded one.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    offsets = torch.zeros(len(sequences), dtype=torch.long)
    for i, seq in enumerate(sequences):
        start = width - len(seq) if side == "left" else 0
        ids[i, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, start : start + len(seq)] = 1
        offsets[i] = start
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, offsets


def capture_activations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str | None] | None = None,
    layers: Sequence[int] | int | None = None,
    *,
    backend: str = "torch",
    batch_size: int = 16,
    padding_side: str = "left",
    keep_tokens: bool = False,
    progress: bool = False,
    truncate: bool = True,
    require_response: bool = False,
) -> Activations:
    """Run (prompt, response) pairs through the model and pool the residual stream per sample.

    Args:
        model: HF causal LM.
        tokenizer: its tokenizer.
        prompts: fully formatted prompt strings (see ``steerlib.core.chat.format_prompt``).
        responses: the assistant's reply to each prompt, or None (prompt-only samples).
        layers: residual-stream layers to keep (None = all).
        backend: "torch" (hooks), "transformer_lens" (TransformerBridge) or "nnsight".
        batch_size: samples per forward pass; samples are length-sorted to waste little padding.
        padding_side: "left" or "right"; results agree either way.
        keep_tokens: also return every token's activation per sample.
        progress: show a progress bar.
        truncate: with the torch backend, stop each forward pass after the deepest requested layer.
        require_response: raise if a response tokenises to nothing (nothing to average).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {sorted(BACKENDS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    responses = _check_samples(prompts, responses)
    model = unwrap_model(model)  # a PEFT wrapper nests the HF model one level deeper; LoRA layers stay active
    layout = get_layout(model)
    layers = check_layers(layout, layers)
    encoded = encode_samples(tokenizer, prompts, responses, require_response)
    check_context(model, [len(ids) for ids, _ in encoded], [f"sample {i} (prompt + response)"
                                                            for i in range(len(encoded))])
    return capture_encoded(model, encoded, layers, pad_id=pad_token_id(tokenizer), backend=backend,
                           batch_size=batch_size, padding_side=padding_side, keep_tokens=keep_tokens,
                           progress=progress, truncate=truncate, tokenizer=tokenizer)


def capture_encoded(
    model: nn.Module,
    encoded: Sequence[tuple[Sequence[int], int]],
    layers: Sequence[int],
    *,
    pad_id: int,
    backend: str = "torch",
    batch_size: int = 16,
    padding_side: str = "left",
    keep_tokens: bool = False,
    progress: bool = False,
    truncate: bool = True,
    tokenizer=None,
) -> Activations:
    """``capture_activations`` of samples already tokenised: ``(token ids, prompt length)`` each (the boundary
    ``tokenize_pairs`` makes), at checked ``layers``; a serving engine captures logged token sequences with it.
    ``tokenizer`` is needed by the transformer_lens and nnsight backends only."""
    model = unwrap_model(model)
    layout = get_layout(model)
    layers = list(layers)
    n, n_sel, d = len(encoded), len(layers), layout.d_model
    pooled = {kind: torch.full((n, n_sel, d), float("nan")) for kind in POOLINGS}
    tokens: list[Tensor | None] = [None] * n
    token_norms = torch.zeros(n, n_sel)
    device = next(model.parameters()).device
    order = sorted(range(n), key=lambda i: len(encoded[i][0]), reverse=True)
    bar = tqdm(total=n, desc=f"capture ({backend})", unit="sample", disable=not progress)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        ids, mask, positions, offsets = pad_batch([encoded[i][0] for i in idx], pad_id, padding_side)
        hidden = run_backend(backend, model, tokenizer, ids.to(device), mask.to(device), positions.to(device), layers,
                             truncate=truncate)
        stacked = torch.stack([hidden[layer].float().cpu() for layer in layers], dim=1)  # [B, n_sel, T, D]
        for row, i in enumerate(idx):
            seq_len, p_len = len(encoded[i][0]), encoded[i][1]
            off = int(offsets[row])
            acts = stacked[row, :, off : off + seq_len]  # [n_sel, seq, D]
            _pool_sample(acts, p_len, pooled, token_norms, i)
            if keep_tokens:
                tokens[i] = acts.clone()
        bar.update(len(idx))
    bar.close()
    return Activations(
        layers=layers,
        pooled=pooled,
        prompt_lengths=[e[1] for e in encoded],
        response_lengths=[len(e[0]) - e[1] for e in encoded],
        token_norms=token_norms,
        tokens=tokens if keep_tokens else None,  # type: ignore[arg-type]
        meta={"backend": backend},
    )


def _pool_sample(acts: Tensor, p_len: int, pooled: dict[str, Tensor], token_norms: Tensor, i: int) -> None:
    """Pool one sample's tokens ``acts`` [n_sel, seq, D] (prompt first, ``p_len`` tokens) into row ``i``."""
    pooled["prompt_mean"][i] = acts[:, :p_len].mean(dim=1)
    pooled["prompt_last"][i] = acts[:, p_len - 1]
    token_norms[i] = acts.norm(dim=-1).median(dim=1).values
    if acts.shape[1] > p_len:
        pooled["response_mean"][i] = acts[:, p_len:].mean(dim=1)


def activations_from_hidden(
    hidden: Mapping[int, Tensor],
    attention_mask: Tensor,
    prompt_lengths: Sequence[int],
    *,
    keep_tokens: bool = False,
    meta: Mapping[str, object] | None = None,
) -> Activations:
    """Pool residual states read elsewhere (another library's hooks) into steerlib's ``Activations``.

    Args:
        hidden: layer -> [B, T, D] states of one padded batch, layers as ``steerlib.core.hooks`` defines them.
        attention_mask: [B, T], 1 on real tokens; padding may be on either side.
        prompt_lengths: per row, how many of its real tokens are the prompt (the rest are the response).
        keep_tokens: also keep every token's activation per sample.
        meta: recorded in ``Activations.meta``.
    """
    if not hidden:
        raise ValueError("no layers given: hidden is empty")
    layers = sorted(hidden)
    first = hidden[layers[0]]
    if first.dim() != 3:
        raise ValueError(f"hidden states must be [batch, seq, d_model], got shape {tuple(first.shape)}")
    for layer in layers:
        if hidden[layer].shape != first.shape:
            raise ValueError(f"layer {layer} has shape {tuple(hidden[layer].shape)}, layer {layers[0]} "
                             f"{tuple(first.shape)}: all layers must come from the same batch")
    n, t, d = first.shape
    if tuple(attention_mask.shape) != (n, t):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the states {(n, t)}")
    if len(prompt_lengths) != n:
        raise ValueError(f"got {len(prompt_lengths)} prompt lengths for a batch of {n}")
    stacked = torch.stack([hidden[layer].detach().float().cpu() for layer in layers], dim=1)  # [B, n_sel, T, D]
    keep = attention_mask.detach().cpu().bool()
    pooled = {kind: torch.full((n, len(layers), d), float("nan")) for kind in POOLINGS}
    token_norms = torch.zeros(n, len(layers))
    tokens: list[Tensor] = []
    lengths = []
    for i in range(n):
        acts = stacked[i][:, keep[i]]  # [n_sel, seq_i, D], padding dropped wherever it was
        p_len = int(prompt_lengths[i])
        if not 1 <= p_len <= acts.shape[1]:
            raise ValueError(f"prompt length {p_len} of row {i} is outside 1..{acts.shape[1]} (its real tokens)")
        _pool_sample(acts, p_len, pooled, token_norms, i)
        lengths.append(acts.shape[1] - p_len)
        if keep_tokens:
            tokens.append(acts.clone())
    return Activations(layers=layers, pooled=pooled, prompt_lengths=[int(p) for p in prompt_lengths],
                       response_lengths=lengths, token_norms=token_norms, tokens=tokens if keep_tokens else None,
                       meta=dict(meta or {}))


def activations_from_pooled(rows: Sequence[Mapping[str, object]], encoded: Sequence[tuple[Sequence[int], int]],
                            layers: Sequence[int], meta: Mapping[str, object] | None = None) -> Activations:
    """``Activations`` from per-sample pools computed elsewhere (inside vLLM, or by a server's
    ``/v1/activations``): each row has ``[len(layers), D]`` ``prompt_mean`` / ``prompt_last`` / ``response_mean``
    (NaN or None where there is no response), ``[len(layers)]`` ``token_norms`` and the token counts it pooled,
    which must equal ``encoded``'s (token ids, prompt length) split.
    """
    if len(rows) != len(encoded):
        raise RuntimeError(f"got pools of {len(rows)} samples for {len(encoded)} samples")
    for i, (row, (ids, p_len)) in enumerate(zip(rows, encoded, strict=True)):
        if (row["prompt_tokens"], row["response_tokens"]) != (p_len, len(ids) - p_len):
            raise RuntimeError(f"steerlib: the engine pooled {row['prompt_tokens']}+{row['response_tokens']} tokens "
                               f"of sample {i}, not {p_len}+{len(ids) - p_len} (prefix-cache hit?)")

    def tensor(value: object) -> Tensor:
        nan = float("nan")
        if isinstance(value, list):
            value = [[nan if x is None else x for x in r] if isinstance(r, list) else (nan if r is None else r)
                     for r in value]
        return torch.as_tensor(value, dtype=torch.float32)

    pooled = {kind: torch.stack([tensor(row[kind]) for row in rows]) for kind in POOLINGS}
    for kind, t in pooled.items():
        if tuple(t.shape[1:2]) != (len(layers),):
            raise RuntimeError(f"{kind}: pools of {t.shape[1]} layers for the {len(layers)} requested")
    return Activations(layers=list(layers), pooled=pooled, prompt_lengths=[p for _, p in encoded],
                       response_lengths=[len(ids) - p for ids, p in encoded],
                       token_norms=torch.stack([tensor(row["token_norms"]) for row in rows]), meta=dict(meta or {}))


def pooled_activations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    layer: int,
    *,
    truncate: bool = True,
) -> tuple[Tensor, Tensor, list[int]]:
    """Response-mean and last-prompt-token activations at one layer, for one batch as given (no re-sorting).

    The single-layer view of ``capture_activations`` that flagging and drift scoring use: every response
    must have at least one token, and the forward pass stops after ``layer`` unless ``truncate=False``.

    Returns:
        (response_mean [B, D], prompt_last [B, D], response token counts), float32 on CPU.
    """
    acts = capture_activations(model, tokenizer, prompts, responses, [layer], batch_size=max(1, len(prompts)),
                               truncate=truncate, require_response=True)
    layer = acts.layers[0]
    return acts.at("response_mean", layer), acts.at("prompt_last", layer), list(acts.response_lengths)
