"""Request models of the server (OpenAI and Ollama wire formats) and the error shape it answers with.

Everything a client sends is checked here, before any work is queued: numbers must be finite and within sane
bounds (a NaN or 1e30 coefficient is a 400, not a 500 or a wrecked monitor), text must be valid Unicode (a lone
surrogate cannot be tokenised), and fields that would change the meaning of the answer but are not implemented
(``tools``, ``suffix``) are refused rather than ignored. Types are strict, as in OpenAI's and Ollama's own
schemas: ``"max_tokens": true`` or ``"stream": "yes"`` is a 400 naming the field, not 1 token or a stream
(every model here sets ``strict=True``; an integer is still a valid float).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from steerlib.serve.contract import MAX_LOGPROBS
from steerlib.steering.plan import build_method, method_named, position_rule
from steerlib.steering.temperature import MIN_TEMPERATURE, effective_temperature

__all__ = [
    "MAX_ABS_COEF",
    "MAX_CAPTURE_SAMPLES",
    "ActivationsRequest",
    "CaptureSample",
    "MIN_TEMPERATURE",
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "OllamaChatRequest",
    "OllamaGenerateRequest",
    "OllamaOptions",
    "OllamaShowRequest",
    "SteeringSpec",
    "parse_preset",
    "parse_presets",
    "WhenSpec",
    "validation_message",
]

# Residual norms of the models steerlib targets are in the tens to hundreds; a coefficient beyond this is a
# typo or an attack, and it would push activations to inf.
MAX_ABS_COEF = 1000.0
MAX_ABS_BOUND = 1e6
MAX_STOP = 4
MAX_N = 8


def _greedy_below_floor(value: float | None) -> float | None:
    """Temperatures in (0, MIN_TEMPERATURE) become 0 (greedy; the rule ``steerlib.generate`` follows too)."""
    return None if value is None else effective_temperature(value)


def _valid_unicode(text: str) -> str:
    """Refuse strings that cannot be encoded as UTF-8 (lone surrogates from ``"\\ud800"`` escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains an invalid Unicode code point at index {exc.start} (a lone surrogate)") from None
    return text


class WhenSpec(BaseModel):
    """A steering entry's condition: steer only where the token's projection on ``vector`` is above/below a
    threshold, measured at the edit's own layer (``layer``, when given, must be that layer)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    vector: str = Field(description="name of a loaded trait vector whose projection decides")
    layer: int | None = Field(None, ge=1, le=10_000, description="must equal the edit's layer when given")
    above: float | None = Field(None, ge=-MAX_ABS_BOUND, le=MAX_ABS_BOUND, allow_inf_nan=False)
    below: float | None = Field(None, ge=-MAX_ABS_BOUND, le=MAX_ABS_BOUND, allow_inf_nan=False)

    @model_validator(mode="after")
    def _threshold(self) -> WhenSpec:
        if self.above is None and self.below is None:
            raise ValueError("a condition needs 'above' and/or 'below'")
        return self


class SteeringSpec(BaseModel):
    """One steering edit requested by a client (see ``steerlib.steering.steer.build_ops``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    vector: str = Field(description="name of a trait vector loaded by the server")
    layer: int | None = Field(None, ge=1, le=10_000,
                              description="residual layer 1..n_layers (default: the vector's recommended one)")
    layers: list[int] | None = Field(None, min_length=1, max_length=256,
                                     description="several layers instead of one (e.g. a calibrated cap's range)")
    coef: float = Field(1.0, ge=-MAX_ABS_COEF, le=MAX_ABS_COEF, allow_inf_nan=False,
                        description="the method's strength (mode 'add': scale of the added vector)")
    mode: str = Field("add", max_length=64, description="a registered steering method (add, ablate, cap...)")
    positions: str = Field("all", max_length=1024,
                           description="a position rule: all, prompt, response, first:N, window:A-B, marker:TEXT...")
    params: dict[str, bool | int | float | str | None] | None = Field(
        None, max_length=32, description="the method's own parameters by name")
    cap_min: float | None = Field(None, ge=-MAX_ABS_BOUND, le=MAX_ABS_BOUND, allow_inf_nan=False)
    cap_max: float | None = Field(None, ge=-MAX_ABS_BOUND, le=MAX_ABS_BOUND, allow_inf_nan=False)
    relative: bool = Field(False, description="coef is a fraction of the typical residual norm at the layer")
    cap_percentile: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False,
                                         description="cap at this percentile of the vector's calibration")
    cap_side: Literal["max", "min"] = Field("max", description="cap_percentile caps from above (max) or floors")
    when: WhenSpec | None = Field(None, description="steer only where this condition holds")
    latch: bool = Field(False, description="with 'when': once open for a response, stay open for the rest of it")

    @field_validator("mode")
    @classmethod
    def _registered_method(cls, mode: str) -> str:
        method_named(mode)  # the registry decides which methods exist
        return mode

    @field_validator("positions")
    @classmethod
    def _registered_rule(cls, positions: str) -> str:
        position_rule(positions)  # the registered rule named by the prefix parses the rest
        return positions

    @model_validator(mode="after")
    def _bounds_in_order(self) -> SteeringSpec:
        # The method checks its own parameters (names, types, values).
        method = method_named(self.mode)
        if self.cap_percentile is None:
            build_method(self.mode, self.coef, self.cap_min, self.cap_max, self.params)
        elif self.params:
            method.from_params(self.params)
        if self.cap_min is not None and self.cap_max is not None and self.cap_min > self.cap_max:
            raise ValueError(f"cap_min ({self.cap_min}) must be <= cap_max ({self.cap_max})")
        if self.layer is not None and self.layers is not None:
            raise ValueError("give layer or layers, not both")
        if any(not 1 <= x <= 10_000 for x in self.layers or ()):
            raise ValueError("layers must lie in 1..n_layers")
        if self.latch and self.when is None:
            raise ValueError("latch needs a 'when' condition")
        if self.cap_percentile is not None:
            if "mode" in self.model_fields_set and self.mode != "cap":
                raise ValueError(f"cap_percentile is a cap; it cannot be combined with mode {self.mode!r}")
            if self.cap_min is not None or self.cap_max is not None:
                raise ValueError("give cap_percentile or cap_min/cap_max, not both")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str

    _check = field_validator("text")(_valid_unicode)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        return _valid_unicode(value) if isinstance(value, str) else value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


def _checked_stop(value: str | list[str] | None) -> str | list[str] | None:
    """``stop`` unchanged once ``_stop_list`` accepts it (a field validator shared by chat and completions)."""
    _stop_list(value)
    return value


def _stop_list(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    if len(items) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(items)}")
    for s in items:
        if not s:
            raise ValueError("stop sequences must be non-empty strings")
        _valid_unicode(s)
    return tuple(items)


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request the server honours, plus ``steering``.

    Unknown fields are ignored (clients send many optional ones).
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Any = None
    steering: list[SteeringSpec] | None = Field(None, max_length=64)
    conversation_id: str | None = None  # steerlib extension (or the X-Conversation-Id header): multi-turn drift

    _greedy = field_validator("temperature")(_greedy_below_floor)

    _stop = field_validator("stop")(_checked_stop)

    @field_validator("response_format")
    @classmethod
    def _plain_text_only(cls, value: Any) -> Any:
        # Structured output changes what a valid answer is; accepting and ignoring it would hand back prose
        # to a client that will parse JSON. Only the default, {"type": "text"}, is honoured.
        if value is None or value == {"type": "text"}:
            return value
        kind = value.get("type") if isinstance(value, dict) else value
        raise ValueError(f"{kind!r} is not supported (structured output is not implemented; only "
                         "{\"type\": \"text\"} is accepted)")

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        return _stop_list(self.stop)


MAX_PROMPTS = 64  # prompts in one /v1/completions request (each runs n rows)


class CompletionRequest(BaseModel):
    """The subset of OpenAI's (legacy) completions request the server honours, plus ``steering``.

    ``prompt`` is text, token ids, or a list of either (one answer per prompt, ``n`` choices each, choice index
    ``prompt index * n + i``). ``max_tokens`` may be 0 (with ``echo``: only the prompt's log-probabilities, what
    lm-evaluation-harness asks for). Unknown fields are ignored.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None
    steering: list[SteeringSpec] | None = Field(None, max_length=64)

    _greedy = field_validator("temperature")(_greedy_below_floor)

    _stop = field_validator("stop")(_checked_stop)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not items:
            raise ValueError("the prompt is empty")
        if len(items) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts, got {len(items)}")
        for item in items:
            if not item:
                raise ValueError("the prompt is empty")
            if isinstance(item, str):
                _valid_unicode(item)
            elif any(t < 0 for t in item):
                raise ValueError("token ids must be >= 0")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: Any) -> Any:
        if value:  # inserting text after the completion changes what is generated; not implemented
            raise ValueError("suffix is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: Any) -> Any:
        if value is not None and value != 1:
            raise ValueError("best_of is not supported (use n)")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: text or token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)

    def stop_sequences(self) -> tuple[str, ...]:
        return _stop_list(self.stop)


class OllamaMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    images: list[Any] | None = None

    _check = field_validator("content")(_valid_unicode)


class OllamaOptions(BaseModel):
    """The Ollama ``options`` the server honours, plus ``steer`` (a list of steering specs)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    num_predict: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] | None = None
    steer: list[SteeringSpec] | None = Field(None, max_length=64)

    _greedy = field_validator("temperature")(_greedy_below_floor)

    _stop = field_validator("stop")(_checked_stop)


class OllamaChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    messages: list[OllamaMessage] = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told otherwise
    options: OllamaOptions | None = None
    tools: list[Any] | None = None
    format: Any = None
    conversation_id: str | None = None


class OllamaGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions | None = None
    format: Any = None
    conversation_id: str | None = None

    _check = field_validator("prompt", "system")(lambda v: _valid_unicode(v) if isinstance(v, str) else v)


class VectorLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(min_length=1, max_length=4096)

    @field_validator("path")
    @classmethod
    def _usable_path(cls, value: str) -> str:
        _valid_unicode(value)
        if "\x00" in value:  # no file system takes it; Path.resolve would raise deep inside the registry
            raise ValueError("contains a NUL character")
        return value


MAX_CAPTURE_SAMPLES = 256  # samples in one /v1/activations request (three [layers, D] rows come back for each)


class CaptureSample(BaseModel):
    """One (prompt, response) pair to capture: token ids with the prompt's length (exact boundary, what
    ``steerlib.serve.remote`` sends), a formatted prompt as text, or chat messages (the server's template)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    token_ids: list[int] | None = Field(None, min_length=1)
    prompt_tokens: int | None = Field(None, ge=1)
    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    response: str | None = None

    @field_validator("prompt", "response")
    @classmethod
    def _unicode(cls, value: str | None) -> str | None:
        return None if value is None else _valid_unicode(value)

    @model_validator(mode="after")
    def _one_form(self) -> CaptureSample:
        forms = [name for name in ("token_ids", "prompt", "messages") if getattr(self, name) is not None]
        if len(forms) != 1:
            raise ValueError("give exactly one of token_ids (with prompt_tokens), prompt or messages")
        if self.token_ids is not None:
            if self.prompt_tokens is None or self.response is not None:
                raise ValueError("token_ids needs prompt_tokens (the prompt's length) and no response")
            if self.prompt_tokens > len(self.token_ids):
                raise ValueError(f"prompt_tokens {self.prompt_tokens} is more than the {len(self.token_ids)} "
                                 f"token ids")
        elif self.prompt_tokens is not None:
            raise ValueError("prompt_tokens goes with token_ids")
        return self


class ActivationsRequest(BaseModel):
    """``POST /v1/activations``: pooled residuals of logged (prompt, response) pairs, read inside the engine."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    samples: list[CaptureSample] = Field(min_length=1, max_length=MAX_CAPTURE_SAMPLES)
    layers: list[int] | None = Field(None, min_length=1, max_length=1024)


class OllamaShowRequest(BaseModel):
    """``POST /api/show``: the model to describe (``model``, or ``name`` from older clients)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    name: str | None = None


def parse_preset(text: str) -> tuple[str, SteeringSpec]:
    """One ``--preset NAME=VECTOR@LAYER:COEF`` option as (name, steering spec); bad text is one line.

    Args:
        text: e.g. ``"cheerful=optimistic@22:+4"``.

    Returns:
        The preset name and its steering edit (a name given twice collects several edits).
    """
    name, eq, rest = text.partition("=")
    vector, at, layer_coef = rest.partition("@")
    layer, colon, coef = layer_coef.partition(":")
    form = "NAME=VECTOR@LAYER:COEF, e.g. cheerful=optimistic@22:+4"
    if not (eq and at and colon and name.strip() and vector.strip()):
        raise ValueError(f"--preset {text!r}: expected {form}")
    name = name.strip()
    if not all(c.isalnum() or c in "_.-" for c in name) or len(name) > 64:
        raise ValueError(f"--preset {text!r}: the name may hold letters, digits, '_', '.' and '-' (at most 64)")
    try:
        spec = SteeringSpec(vector=vector.strip(), layer=int(layer), coef=float(coef))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"--preset {text!r}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except ValueError as exc:  # int() or float() of text that is no number
        raise ValueError(f"--preset {text!r}: {exc} (expected {form})") from None
    return name, spec


class ApiError(Exception):
    """An error returned to the client in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(one-line message, dotted parameter path) for the first problem pydantic found."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def parse_presets(texts: list[str] | tuple[str, ...]) -> tuple[tuple[str, tuple[SteeringSpec, ...]], ...]:
    """Every ``--preset`` option, grouped by name in the order first given (``AppOptions.presets``)."""
    grouped: dict[str, list[SteeringSpec]] = {}
    for text in texts:
        name, spec = parse_preset(text)
        grouped.setdefault(name, []).append(spec)
    return tuple((name, tuple(specs)) for name, specs in grouped.items())
