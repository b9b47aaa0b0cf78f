"""Batched generation, optionally steered and read out per token, and a streaming variant.

Per-token read-out convention: the projection paired with generated token ``t`` is read at the position
whose output produced ``t``. The first generated token therefore pairs with the last prompt token, which
is the paper's pre-generation predictor (section 3.3), and every value is available the moment its token
is emitted, which is what streaming needs.

"A response's projection" has one meaning in steerlib: the mean over the response tokens' own positions, as
``steerlib monitor`` and ``flag`` compute it from a logged conversation. ``Generation.mean_projection`` gives
exactly that: the paired values from the second on are read at response tokens, and the last token's own
read-out comes from one extra forward pass at the end of generation (``closing``), which the serving engine
does too. The last prompt token's value is ``prompt_last_projection``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from steerlib.core.capture import check_context, pad_batch, pad_token_id
from steerlib.core.checks import check_int, check_number, check_text
from steerlib.core.compat import cache_keyword, output_cache
from steerlib.core.models import eos_ids
from steerlib.core.renamed import warn_renamed
from steerlib.steering.compiled import generate_batch
from steerlib.steering.readout import response_values
from steerlib.steering.steer import ResidualEditor, SteerOp, TraitReadout
from steerlib.steering.temperature import effective_temperature

# Another generator of response texts (e.g. vLLM's): (formatted prompts, max_new_tokens, temperature, seed) -> texts.
GenerateTexts = Callable[[list[str], int, float, "int | None"], list[str]]


def _marker_criteria(editor: ResidualEditor, tokenizer, prompt_width: int) -> list[StoppingCriteria]:
    """Criteria that let edits starting at a marker string see it appear (none without one); they never stop."""
    watcher = editor.marker_watcher(tokenizer, prompt_width)
    return [] if watcher is None else [watcher]


def _marker_kwargs(editor: ResidualEditor, tokenizer, prompt_width: int) -> dict:
    """``generate`` arguments for ``_marker_criteria`` (none without a marker)."""
    criteria = _marker_criteria(editor, tokenizer, prompt_width)
    return {"stopping_criteria": StoppingCriteriaList(criteria)} if criteria else {}


@dataclass
class Generation:
    """One prompt's generated text with its per-token trait projections.

    Attributes:
        prompt: the formatted prompt.
        text: decoded response (special tokens removed).
        token_ids: generated token ids (up to and excluding padding after EOS).
        projections: [n_tokens, n_readout_layers, K] on unit trait directions, paired with the tokens they
            produced (row 0: the last prompt token), or None without a read-out.
        trait_names: names of the K traits read out.
        layers: read-out layers.
        closing: [n_readout_layers, K] read at the last generated token's own position when the response did
            not end with EOS (an EOS token's paired value is read at the last response token already).
    """

    prompt: str
    text: str
    token_ids: list[int]
    projections: Tensor | None = None
    trait_names: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    closing: Tensor | None = None

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

    def response_projections(self, trait: str | None = None, layer: int | None = None) -> Tensor:
        """[n_response_tokens] projection at each response token's own position (EOS excluded)."""
        li, k = self._index(trait, layer)
        return response_values(self.projections[:, li, k], self.closing[li, k] if self.closing is not None else None)

    def mean_projection(self, trait: str | None = None, layer: int | None = None) -> float:
        """Mean over the response tokens (the meaning ``steerlib monitor`` and the server use)."""
        return float(self.response_projections(trait, layer).mean())

    def max_projection(self, trait: str | None = None, layer: int | None = None) -> float:
        """Max over the response tokens."""
        return float(self.response_projections(trait, layer).max())


def _one_readout(readout: TraitReadout | None, monitor: TraitReadout | None) -> TraitReadout | None:
    """The read-out to use; ``monitor=`` (the first release's name) still works, with a DeprecationWarning."""
    if monitor is None:
        return readout
    if readout is not None:
        raise ValueError("pass readout= only (monitor= is its old name)")
    warn_renamed("monitor=", "readout=")
    return monitor


def _sampling_kwargs(max_new_tokens: int, temperature: float, top_p: float, pad_id: int) -> dict:
    check_int(max_new_tokens, "max_new_tokens")
    # NaN would silently mean greedy; a tiny temperature is greedy on purpose (steerlib.steering.temperature).
    temperature = effective_temperature(check_number(temperature, "temperature", minimum=0))
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


def _closing_readout(model: nn.Module, readout: TraitReadout, sequences: Tensor, prompt_mask: Tensor,
                     cache) -> Tensor:
    """Feed every row's last generated token once more and return its read-out [B, n_layers, K].

    ``generate`` never feeds the token it samples last, so that token's own position has no read-out; this one
    extra pass (steered like any response token, through the hooks already installed) supplies it.
    """
    b = sequences.shape[0]
    n_new = sequences.shape[1] - prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones((b, n_new))], dim=1)
    position = (mask.sum(1, keepdim=True) - 1).long()
    model(input_ids=sequences[:, -1:], attention_mask=mask, position_ids=position,
          cache_position=torch.tensor([mask.shape[1] - 1], device=mask.device), use_cache=True,
          **{cache_keyword(model): cache})
    return torch.stack([readout.records[layer][-1][:, -1].float().cpu() for layer in readout.layers], dim=1)


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
        monitor: the first release's name for ``readout`` (deprecated: warns).
        max_new_tokens: generation length cap.
        temperature: 0 for greedy decoding; below ``MIN_TEMPERATURE`` (0.01) also greedy, as in the server
            (dividing the logits by a tinier one overflows float32; see ``steerlib.steering.temperature``).
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
        closing = None
        if compile:
            new, rows = generate_batch(model, ids.to(device), mask.to(device), kwargs, steering=steering,
                                       readout=readout,
                                       compile_options=compile if isinstance(compile, dict) else None)
            if rows is not None:  # the buffer's extra last step holds the closing pass's read-out
                rows, closing = rows[:, :-1], rows[:, -1]
            per_row = list(rows) if rows is not None else [None] * len(idx)
        else:
            with ResidualEditor(model, steering, readout) as editor:
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     return_dict_in_generate=True, **kwargs,
                                     **_marker_kwargs(editor, tokenizer, ids.shape[1]))
                new = out.sequences[:, ids.shape[1]:].cpu()
                per_row = _split_readout(readout, len(idx), new.shape[1])
                if readout is not None:
                    closing = _closing_readout(model, readout, out.sequences, mask.to(device),
                                               output_cache(out))
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            n = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
            ended = n < len(tokens) or (tokens and tokens[-1] in eos)
            tokens = tokens[:n]
            proj = per_row[row][:n] if per_row[row] is not None else None
            results[i] = Generation(
                prompt=prompts[i],
                text=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                token_ids=tokens,
                projections=proj,
                trait_names=tuple(readout.names) if readout else (),
                layers=tuple(readout.layers) if readout else (),
                closing=closing[row] if closing is not None and not ended else None,
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


class _StopWhenSet(StoppingCriteria):
    """Ends ``generate`` at the next token once the consumer of ``stream`` has gone (closed the generator)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs) -> Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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
    re-raised here). Closing the generator early (``close()``, ``break`` out of a ``for`` loop that then drops
    it, an exception in the consumer) stops decoding at the next token and waits for the thread, so when
    ``close()`` returns the model carries no hooks of this call and the thread is gone.
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
    abandoned = threading.Event()
    stop = StoppingCriteriaList([_StopWhenSet(abandoned)])

    def run() -> None:
        try:
            with torch.inference_mode(), ResidualEditor(model, steering, readout) as editor:
                model.generate(input_ids=torch.tensor([encoded], device=device), streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([*stop, *_marker_criteria(editor, tokenizer,
                                                                                                 len(encoded))]),
                               **kwargs)
        except BaseException as exc:  # surfaced in the consumer's thread
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, name="steerlib-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = streamer.queue.get()
            if item is None:
                break
            token_id, proj = item
            if token_id in eos:
                continue
            yield tokenizer.decode([token_id], skip_special_tokens=True), proj
    finally:
        # Reached on normal end and on close(): stop at the next token, then wait until the thread's
        # ResidualEditor has removed its hooks (a steered model must not outlive its stream).
        abandoned.set()
        thread.join()
    if errors:
        raise errors[0]
