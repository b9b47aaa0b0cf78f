"""Batched generation, optionally steered and read out per token, and a streaming variant.

Per-token read-out convention: the projection paired with generated token ``t`` is read at the position
whose output produced ``t``. The first generated token therefore pairs with the last prompt token, which
is the paper's pre-generation predictor (section 3.3), and every value is available the moment its token
is emitted, which is what streaming needs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from steerlib.core.capture import check_context, pad_batch, pad_token_id
from steerlib.core.checks import check_int, check_number, check_text
from steerlib.steering.compiled import generate_batch
from steerlib.steering.steer import ResidualEditor, SteerOp, TraitReadout

# Another generator of response texts (e.g. vLLM's): (formatted prompts, max_new_tokens, temperature, seed) -> texts.
GenerateTexts = Callable[[list[str], int, float, "int | None"], list[str]]


@dataclass
class Generation:
    """One prompt's generated text with its per-token trait projections.

    Attributes:
        prompt: the formatted prompt.
        text: decoded response (special tokens removed).
        token_ids: generated token ids (up to and excluding padding after EOS).
        projections: [n_tokens, n_readout_layers, K] on unit trait directions, or None without a read-out.
        trait_names: names of the K traits read out.
        layers: read-out layers.
    """

    prompt: str
    text: str
    token_ids: list[int]
    projections: Tensor | None = None
    trait_names: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()

    def _index(self, trait: str | None, layer: int | None) -> tuple[int, int]:
        if self.projections is None:
            raise ValueError("this generation had no trait read-out")
        k = 0 if trait is None else self.trait_names.index(trait)
        li = 0 if layer is None else self.layers.index(layer)
        return li, k

    def token_projections(self, trait: str | None = None, layer: int | None = None) -> Tensor:
        """[n_tokens] projection per generated token for one trait and layer (defaults: the first)."""
        li, k = self._index(trait, layer)
        return self.projections[:, li, k]

    def prompt_last_projection(self, trait: str | None = None, layer: int | None = None) -> float:
        """Projection of the last prompt token: predicts the trait before any token is generated."""
        return float(self.token_projections(trait, layer)[0])

    def mean_projection(self, trait: str | None = None, layer: int | None = None) -> float:
        return float(self.token_projections(trait, layer).mean())

    def max_projection(self, trait: str | None = None, layer: int | None = None) -> float:
        return float(self.token_projections(trait, layer).max())


def _one_readout(readout: TraitReadout | None, monitor: TraitReadout | None) -> TraitReadout | None:
    if readout is not None and monitor is not None:
        raise ValueError("pass readout= only (monitor= is its old name)")
    return readout if readout is not None else monitor


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every token id that ends a response: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = ids if isinstance(ids, list) else [ids]
    out = {i for i in ids if i is not None}
    if tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return out


def _sampling_kwargs(max_new_tokens: int, temperature: float, top_p: float, pad_id: int) -> dict:
    check_int(max_new_tokens, "max_new_tokens")
    temperature = check_number(temperature, "temperature", minimum=0)  # NaN would silently mean greedy
    top_p = check_number(top_p, "top_p", minimum=0, strict=True)
    if top_p > 1:
        raise ValueError(f"top_p must be within (0, 1], got {top_p:g}")
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def _encode(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ValueError(f"prompt {i} must be a non-empty string")
        check_text(p, f"prompt {i}")
        out.append(list(tokenizer(p, add_special_tokens=False)["input_ids"]))
    return out


def _split_readout(readout: TraitReadout | None, rows: int, steps: int) -> list[Tensor | None]:
    """Per-row [steps, n_layers, K] from the read-out's per-forward records ([B, seq, K] each)."""
    if readout is None:
        return [None] * rows
    per_layer = []
    for layer in readout.layers:
        recs = readout.records[layer]
        # Forward pass j produced token j: take its last position.
        per_layer.append(torch.stack([r[:, -1].float().cpu() for r in recs[:steps]], dim=1))  # [B, steps, K]
    stacked = torch.stack(per_layer, dim=2)  # [B, steps, n_layers, K]
    return [stacked[i] for i in range(rows)]


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    steering: Sequence[SteerOp] = (),
    readout: TraitReadout | None = None,
    monitor: TraitReadout | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int | None = None,
    progress: bool = False,
    compile: bool | dict = False,
) -> list[Generation]:
    """Generate a response for each formatted prompt, with optional steering and per-token trait read-out.

    Args:
        model: HF causal LM.
        tokenizer: its tokenizer.
        prompts: formatted prompts (``steerlib.core.chat.format_prompt``).
        steering: ``SteerOp``s applied during generation (see ``steerlib.steering.steer.build_ops``).
        readout: a ``TraitReadout`` whose traits are read out per generated token.
        monitor: the first release's name for ``readout``.
        max_new_tokens: generation length cap.
        temperature: 0 for greedy decoding.
        top_p: nucleus sampling when temperature > 0.
        batch_size: prompts per batch (left padded).
        seed: seed for sampling.
        progress: show a progress bar.
        compile: decode with a static KV cache and a ``torch.compile(fullgraph=True)`` decode step, the
            steering and read-out traced into it (``steerlib.steering.compiled``); a dict gives ``CompileConfig``
            overrides such as ``{"backend": "aot_eager"}``. Each new (batch, prompt length) shape compiles
            again, so it pays off for long generations or repeated shapes. Default: eager, as before.
    """
    readout = _one_readout(readout, monitor)
    batch_size = check_int(batch_size, "batch_size")
    pad_id = pad_token_id(tokenizer)
    kwargs = _sampling_kwargs(max_new_tokens, temperature, top_p, pad_id)
    encoded = _encode(tokenizer, prompts)
    check_context(model, [len(e) for e in encoded], [f"prompt {i}" for i in range(len(encoded))],
                  extra=max_new_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    eos = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        ids, mask, _, _ = pad_batch([encoded[i] for i in idx], pad_id, "left")
        if compile:
            new, rows = generate_batch(model, ids.to(device), mask.to(device), kwargs, steering=steering,
                                       readout=readout,
                                       compile_options=compile if isinstance(compile, dict) else None)
            per_row = list(rows) if rows is not None else [None] * len(idx)
        else:
            with ResidualEditor(model, steering, readout):
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
                new = out[:, ids.shape[1]:].cpu()
                per_row = _split_readout(readout, len(idx), new.shape[1])
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            n = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
            tokens = tokens[:n]
            proj = per_row[row][:n] if per_row[row] is not None else None
            results[i] = Generation(
                prompt=prompts[i],
                text=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                token_ids=tokens,
                projections=proj,
                trait_names=tuple(readout.names) if readout else (),
                layers=tuple(readout.layers) if readout else (),
            )
        bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]


class _ProjectionStreamer(BaseStreamer):
    """Pairs each new token with the projections recorded in the forward pass that produced it."""

    def __init__(self, readout: TraitReadout | None):
        self.readout = readout
        self.queue: queue.Queue = queue.Queue()
        self._seen_prompt = False
        self._step = 0

    def put(self, value: Tensor) -> None:
        if not self._seen_prompt:  # generate() first hands over the prompt ids
            self._seen_prompt = True
            return
        proj = None
        if self.readout is not None:
            proj = torch.stack(
                [self.readout.records[layer][self._step][0, -1].float().cpu() for layer in self.readout.layers]
            )
        self._step += 1
        self.queue.put((int(value.reshape(-1)[0]), proj))

    def end(self) -> None:
        self.queue.put(None)


def stream(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    steering: Sequence[SteerOp] = (),
    readout: TraitReadout | None = None,
    monitor: TraitReadout | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Iterator[tuple[str, Tensor | None]]:
    """Yield (token text, projections [n_readout_layers, K] or None) for one prompt as tokens are generated.

    Generation runs in a background thread; hooks are removed when it ends, also if it raises (the error is
    re-raised here).
    """
    pad_id = pad_token_id(tokenizer)
    kwargs = _sampling_kwargs(max_new_tokens, temperature, top_p, pad_id)
    encoded = _encode(tokenizer, [prompt])[0]
    check_context(model, [len(encoded)], ["the prompt"], extra=max_new_tokens)
    eos = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    readout = _one_readout(readout, monitor)
    streamer = _ProjectionStreamer(readout)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode(), ResidualEditor(model, steering, readout):
                model.generate(input_ids=torch.tensor([encoded], device=device), streamer=streamer, **kwargs)
        except BaseException as exc:  # surfaced in the consumer's thread
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while True:
        item = streamer.queue.get()
        if item is None:
            break
        token_id, proj = item
        if token_id in eos:
            continue
        yield tokenizer.decode([token_id], skip_special_tokens=True), proj
    thread.join()
    if errors:
        raise errors[0]
