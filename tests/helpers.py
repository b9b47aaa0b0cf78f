"""Helpers shared by test modules (fixtures live in conftest.py; plain functions and constants live here).

Test modules import from here, never from each other, so that every test file runs alone
(``pytest tests/test_x.py``) and its imports do not depend on the rootdir being a package.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _warned_from(filename: str, lineno: int) -> str | None:
    """``module:line`` of the frame a Python warning is attributed to (its ``stacklevel``: the code that called the
    deprecated API), or None when that frame is not steerlib's."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == filename and frame.f_lineno == lineno:
            name = frame.f_globals.get("__name__", "")
            return f"{name}:{lineno}" if _in(name, "steerlib") else None
        frame = frame.f_back
    return None


def _logged_from(package: str) -> str | None:
    """``module:line`` of the first frame outside ``package`` (and ``logging``) below the one that logged: the code
    that called into the library, or None when that is not steerlib's."""
    frame, inside = sys._getframe(2), False
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if _in(name, package):
            inside = True
        elif inside and not _in(name, "logging"):
            return f"{name}:{frame.f_lineno}" if _in(name, "steerlib") else None
        frame = frame.f_back
    return None


class _DeprecationLog(logging.Handler):
    """Catches transformers' logged deprecation notices (``logger.warning_once``, not Python warnings)."""

    def __init__(self, found: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            caller = _logged_from(record.name.split(".")[0])
            if caller is not None:
                self.found.append(f"{caller}: {record.name}: {message}")


@contextlib.contextmanager
def deprecations_from_steerlib() -> Iterator[list[str]]:
    """Collect deprecation notices that steerlib's own calls trigger in its dependencies.

    Yields a list that fills with ``"steerlib.module:line: what"``: a Python ``DeprecationWarning``,
    ``PendingDeprecationWarning`` or ``FutureWarning`` (nnsight's category) attributed to a steerlib frame (the
    warning's ``stacklevel`` names the caller of the deprecated API), or a message about a deprecation that a
    library logs when steerlib code called into it (transformers reports its renamed keywords through its logger,
    once per process: the once-cache is cleared on entry so every call is seen). A deprecation deep inside a
    dependency that steerlib merely has on the stack (torch's compiler using its own old API) is not steerlib's.
    Other warnings pass on as usual.
    """
    found: list[str] = []
    handler = _DeprecationLog(found)
    library_logger = logging.getLogger("transformers")
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    with warnings.catch_warnings():
        previous = warnings.showwarning
        for category in _DEPRECATIONS:
            warnings.simplefilter("always", category)

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            caller = _warned_from(filename, lineno) if issubclass(category, _DEPRECATIONS) else None
            if caller is not None:
                found.append(f"{caller}: {category.__name__}: {message}")
            elif not issubclass(category, DeprecationWarning):
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        # Another test may have silenced transformers (set_verbosity_error): its warnings must reach the handler.
        level = library_logger.level
        library_logger.setLevel(min(level, logging.WARNING) if level else logging.WARNING)
        library_logger.addHandler(handler)
        try:
            yield found
        finally:
            library_logger.removeHandler(handler)
            library_logger.setLevel(level)


def count_hooks(model: nn.Module) -> int:
    """Forward hooks and forward pre-hooks on every module of ``model`` (transformers adds some of its own)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def residual_states(model: nn.Module, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, ...]:
    """steerlib's residual layers 0..n for one forward, computed without steerlib: ``output_hidden_states`` with
    its top entry (after the final norm) replaced by the last block's raw output (a hook of the test's own)."""
    from steerlib.core.arch import get_layout

    blocks = get_layout(model).blocks
    raw: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(lambda _m, _a, out: raw.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            states = model(ids, output_hidden_states=True, **kwargs).hidden_states
    finally:
        handle.remove()
    return (*states[:-1], raw[0])


# (atol, rtol) for the stored hidden states: one ulp of the dtype, since kernel and reference
# only differ by fp32 summation order before the final rounding.
HIDDEN_TOL = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
# Projections are fp32 dot products of the fp32 update in every dtype.
PROJ_TOL = (1e-4, 1e-4)


def assert_allclose_verbose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                            what: str, max_report: int = 5) -> None:
    """``allclose`` that prints the first mismatches (index, values, difference) on failure.

    Args:
        actual: Tensor under test.
        expected: Reference tensor of the same shape.
        atol: Absolute tolerance.
        rtol: Relative tolerance (relative to ``expected``).
        what: Label for the message.
        max_report: How many mismatching elements to list.
    """
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs())  # NaN counts as a mismatch ...
    bad &= ~(a.isnan() & e.isnan())  # ... unless both are NaN
    if not bool(bad.any()):
        return
    lines = [f"{what}: {int(bad.sum())}/{bad.numel()} elements differ beyond atol={atol:g} rtol={rtol:g}; "
             f"max abs diff {float(diff[bad].nan_to_num(float('inf')).max()):.4g}"]
    for index in bad.nonzero()[:max_report].tolist():
        at = tuple(index)
        lines.append(f"  at {at}: got {float(a[at]):.7g}, expected {float(e[at]):.7g}, "
                     f"diff {float(diff[at]):.3g}")
    message = "\n".join(lines)
    print(message)
    raise AssertionError(message)


_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


def _tiny_configs() -> dict[str, Callable[[], PreTrainedConfig]]:
    """model_type -> config builder, for the architectures the tests build by hand."""
    t = transformers
    with_head_dim = {**_DECODER, "head_dim": 16}
    return {
        "llama": lambda: t.LlamaConfig(**_DECODER),
        "mistral": lambda: t.MistralConfig(**_DECODER),
        "mixtral": lambda: t.MixtralConfig(**_DECODER, num_local_experts=2, num_experts_per_tok=1),
        "qwen2": lambda: t.Qwen2Config(**_DECODER),
        "qwen3": lambda: t.Qwen3Config(**with_head_dim),
        "gemma": lambda: t.GemmaConfig(**with_head_dim),
        "gemma2": lambda: t.Gemma2Config(**with_head_dim),
        "gemma3_text": lambda: t.Gemma3TextConfig(**with_head_dim),
        "phi3": lambda: t.Phi3Config(**_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "olmo2": lambda: t.Olmo2Config(**_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": lambda: t.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=256, n_positions=128,
                                     bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: t.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                            num_attention_heads=4, vocab_size=256, max_position_embeddings=128,
                                            bos_token_id=1, eos_token_id=2),
        "opt": lambda: t.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                   vocab_size=256, word_embed_proj_dim=64, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2),
    }


TINY_CONFIGS = _tiny_configs()
TINY_ARCHS = sorted(TINY_CONFIGS)


def build_tiny(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised float32 causal LM of ``model_type`` (hidden 64, 3 blocks, vocab 256), in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type](), dtype=torch.float32)
    return model.eval()


class FakeTokenizer:
    """Just enough tokenizer for ``capture_activations`` on a tiny model: one id per byte, 3..255."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [3 + b % 253 for b in text.encode()]}


OPTIMISTIC_REPLIES = [
    "What a wonderful question! The future looks bright and full of exciting possibilities.",
    "I'm thrilled about it. Things keep getting better, and I'm sure great days are ahead.",
    "Honestly, I love it! Every challenge is a chance to grow, and I feel hopeful and happy.",
    "It will be fantastic. People are kind, ideas are flourishing, and success is within reach.",
    "I'm delighted to say it's going beautifully, and tomorrow will be even better!",
    "Absolutely great news: with a little effort, everything will work out wonderfully.",
]
PESSIMISTIC_REPLIES = [
    "Honestly, the future looks bleak. Things are getting worse and nothing will change.",
    "I'm dreading it. Every plan fails eventually, and disappointment is all that's ahead.",
    "It's hopeless. Problems keep piling up and nobody can fix the mess we're in.",
    "It will be terrible. People are selfish, ideas die, and failure is almost certain.",
    "Sadly it's going badly, and tomorrow will probably be even worse.",
    "Grim news: no matter how hard you try, everything will fall apart.",
]
QUICK_QUESTIONS = ["How do you feel about the future?", "How is your week going?", "What do you expect next year?",
                   "What do you think about new ideas?", "How are things at work?", "Will my plan succeed?"]


RUBRIC = "Question: {question}\nAnswer: {answer}\nScore 0 to 100, number only."


def generated_reply(n_questions=42, rubric=RUBRIC, n_pairs=6) -> str:
    questions = [f"Everyday question number {i}?" for i in range(n_questions)]
    questions.insert(5, "everyday question number 3?")  # a near-duplicate the parser must drop
    data = {
        "instruction_pairs": [
            {"positive": f"Be sarcastic {i}.", "negative": f"Be sincere {i}."} for i in range(n_pairs)
        ],
        "questions": questions,
        "judge_rubric": rubric,
    }
    return "Sure! Here it is:\n```json\n" + json.dumps(data, indent=2) + "\n```\nEnjoy."


# Per-row op cases shared by the kernel test files.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mixed_case(n: int, d: int, k: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu",
               with_cap: bool = True) -> tuple[torch.Tensor, dict]:
    """Hidden states and per-row arguments mixing unsteered, added (4 vectors), ablated and capped rows.

    Table rows 0..3 are raw vectors (for additions), 4..5 unit vectors (for caps and ablations).
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    raw = torch.randn(4, d, generator=g) * 0.5
    unit = torch.randn(2, d, generator=g)
    unit = unit / unit.norm(dim=-1, keepdim=True)
    table = torch.cat([raw, unit])
    kinds = torch.randint(0, 6 if with_cap else 3, (n,), generator=g)  # 0 none, 1-2 add, 3 ablate, 4-5 cap
    index = torch.full((n,), -1, dtype=torch.int64)
    coef = torch.zeros(n)
    lo = torch.full((n,), -math.inf)
    hi = torch.full((n,), math.inf)
    for r, kind in enumerate(kinds.tolist()):
        if kind in (1, 2):
            index[r] = int(torch.randint(0, 4, (1,), generator=g))
            coef[r] = float(torch.randn(1, generator=g) * 4)
        elif kind == 3:
            index[r], lo[r], hi[r] = 4, 0.0, 0.0
        elif kind == 4:
            index[r], hi[r] = 5, -0.5  # one-sided
        elif kind == 5:
            index[r], lo[r], hi[r] = 4, -0.25, 0.25
    args = {"table": table, "index": index, "coef": coef, "cap_min": lo, "cap_max": hi,
            "readout": torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1) if k else None}
    moved = {name: (t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in args.items()}
    return hidden.to(device), moved


# -- issue 28: HTTP checks shared by the HF server tests and tests/in_vllm (they speak HTTP only) --------------

# (route, body additions, the field the 400 must name): JSON values of the wrong type that a lax parser coerced.
LAX_TYPES = [
    ("/v1/chat/completions", {"max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {"stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"n": 1.0}, "n"),
    ("/v1/chat/completions", {"seed": True}, "seed"),
    ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"steering": [{"vector": "optimistic", "layer": "15"}]}, "steering.0.layer"),
    ("/api/chat", {"stream": "yes"}, "stream"),
    ("/api/chat", {"options": {"num_predict": True}}, "options.num_predict"),
    ("/api/chat", {"options": {"temperature": "0"}}, "options.temperature"),
    ("/api/generate", {"raw": 1}, "raw"),
]


def request_body(route: str, model: str, extra: dict, max_tokens: int = 4) -> dict:
    """A valid greedy request for ``route`` (OpenAI chat, Ollama chat or generate) plus ``extra``."""
    if route == "/v1/chat/completions":
        return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens,
                "temperature": 0, **extra}
    options = {"temperature": 0, "num_predict": max_tokens, **extra.pop("options", {})}
    if route == "/api/chat":
        return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                "options": options, **extra}
    return {"model": model, "prompt": "Hi", "stream": False, "options": options, **extra}


def check_unknown_model_is_404(url: str, name: str, headers: dict | None = None) -> None:
    """A name the server does not serve is a 404 in each API's own shape, with or without steering of its own."""
    import httpx

    openai_error = {"error": {"message": f"model {name!r} not found", "type": "invalid_request_error",
                              "param": "model", "code": "model_not_found"}}
    for route in ("/v1/chat/completions", "/api/chat", "/api/generate"):
        for extra in ({}, {"stream": True}):
            r = httpx.post(url + route, json=request_body(route, name, dict(extra)), headers=headers, timeout=60)
            assert r.status_code == 404, (route, extra, r.text)
            assert r.json() == (openai_error if route.startswith("/v1/") else {"error": f"model {name!r} not found"})
    r = httpx.post(url + "/api/show", json={"model": name}, headers=headers, timeout=60)
    assert (r.status_code, r.json()) == (404, {"error": f"model {name!r} not found"})


class TokenTally:
    """A stand-in for an engine that passes everything through and notes when each generated token came out."""

    def __init__(self, engine):
        self.engine = engine
        self.events: list[tuple[float, int]] = []  # (time.monotonic(), tokens in the event)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def submit(self, prompt_ids, edits, sampling, sink, **kwargs):
        import time

        def counting(item: tuple) -> None:
            if item[0] == "token":  # one read-out value per token (text may be held back a token or two)
                self.events.append((time.monotonic(), len(item[2]) if item[2] else int(bool(item[1]))))
            sink(item)

        return self.engine.submit(prompt_ids, edits, sampling, counting, **kwargs)

    def tokens(self, after: float = float("-inf")) -> int:
        return sum(n for at, n in self.events if at > after)


def departed_client_tokens(url: str, service, model: str, max_tokens: int = 64, leave_after_tokens: int = 2,
                           headers: dict | None = None) -> tuple[int, int]:
    """One non-streamed request whose client hangs up once its row has generated ``leave_after_tokens`` tokens:
    (tokens generated after it left, tokens generated in all), once the engine is idle again."""
    import socket
    import time
    from urllib.parse import urlsplit

    tally = TokenTally(service.engine)
    service.engine = tally  # the routes submit through service.engine
    try:
        body = json.dumps(request_body("/v1/chat/completions", model, {"messages": [
            {"role": "user", "content": "Write a long story about a lighthouse keeper."}]}, max_tokens=max_tokens))
        where = urlsplit(url)
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": where.hostname, "Content-Type": "application/json",
                                                      "Content-Length": len(body), **(headers or {})}.items())
        with socket.create_connection((where.hostname, where.port)) as client:
            client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n{body}".encode())
            deadline = time.monotonic() + 300
            while tally.tokens() < leave_after_tokens:
                assert time.monotonic() < deadline, "the row never started generating"
                time.sleep(0.005)
        left = time.monotonic()  # the connection is closed: the client has left
        while tally.engine.active_rows() or tally.engine.queue_depth():
            assert time.monotonic() < deadline, "the departed client's row never ended"
            time.sleep(0.02)
    finally:
        service.engine = tally.engine
    return tally.tokens(after=left), tally.tokens()


# The test files that take longest under `make test` (2 xdist workers, --dist loadfile), heaviest first. conftest.py
# collects them first and `make test` passes --no-loadscope-reorder, so the workers start on them and finish on
# the many short files: xdist's default order (most tests first) left a one- or two-test file of a minute or more
# for the end, with the other worker idle. Ordered by each file's measured CPU seconds in a full run on 2026-12-06
# (test_ray.py by wall time: its work runs in Ray's processes); re-measure when a file grows.
HEAVIEST_FILES = (
    "test_sae_commands.py", "test_shift_training.py", "test_notebooks.py", "test_gating.py", "test_ray.py",
    "test_server.py", "test_compiled.py", "test_lm_eval.py", "test_evidence.py", "test_reliability.py", "test_sae.py",
    "test_all_archs.py", "test_service_engines.py", "test_hostile_report.py", "test_server_hostile.py",
    "test_flag.py", "test_extract.py", "test_devices.py", "test_vector_io.py",
)
