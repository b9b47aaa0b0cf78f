"""Tiny random models of any causal-LM architecture transformers offers, and a check of steerlib's layer convention.

``tiny_config(model_type)`` shrinks the architecture's default config generically (hidden 64, 3 layers, vocab 256,
4 experts, ...) without downloading anything; ``check_architecture(model_type)`` builds it and verifies that
``record_residual`` captures ``output_hidden_states[L]`` at every layer (the top one before the final norm) and that
steering at ``L`` shifts exactly that output. ``tests/test_all_archs.py`` and ``scripts/arch_table.py`` share these.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

# Config keys shrunk wherever they appear (text, vision and audio sub-configs alike).
_SIZES: dict[str, int] = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "model_dim": 64, "embed_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128, "dim_ff": 128,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 64,
    "intermediate_size_mlp": 128, "ffn_inner_hidden_size": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2, "n_head_kv": 2,
    "head_dim": 16, "kv_channels": 16, "attention_head_dim": 16,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "q_lora_rank": 32, "kv_lora_rank": 32,
    "qk_head_dim": 32, "rotary_dim": 16,
    "num_hidden_layers": 3, "n_layer": 3, "n_layers": 3, "num_layers": 3,
    "vocab_size": 256,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128,
    "ssm_state_size": 16, "state_size": 16, "mamba_d_state": 16, "mamba_n_heads": 8, "mamba_d_head": 16,
    "mamba_n_groups": 1, "n_groups": 1, "mamba_headdim": 16, "linear_num_value_heads": 4,
    "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "num_image_tokens": 4, "num_experts_per_token": 2, "linear_head_dim": 16, "linear_num_heads": 4,
    "mamba_d_ssm": 128, "num_dense_layers": 1,
    # hybrids: attention at layer 1, experts at layer 1 of 3
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
}

# The few architectures whose configs tie sizes together in a way the generic shrink cannot guess.
_EXTRA: dict[str, dict[str, Any]] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1], [["global"], 1]]},
    "mamba2": {"num_heads": 8},
    # transformers 5.24's DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define.
    # Hybrids whose default pattern has one kind only (or none): one attention layer between the others.
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"]},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
}

# Keys whose lists or strings run one entry per layer: truncated to the tiny depth.
_PER_LAYER_HINTS = ("layer_types", "layers_block_type", "hybrid_override_pattern", "block_types",
                    "attn_layer_indices", "layer_type", "mlp_only_layers", "pattern")

# Architectures that build and run but where steerlib's check does not hold, with the reason (seen on
# transformers 5.24). The test expects these to keep failing, so a fix upstream or here shows up.
# Architectures whose output_hidden_states has no embeddings entry: [block 0 out, ..., block n-2 out, normed last].
# steerlib's layers are still "0 = embeddings, L = output of block L - 1", so these are checked against that
# shifted reference (verified: capture equals it exactly). RWKV also halves the stream every
# ``rescale_every`` blocks outside the blocks in inference; steerlib reads each block's own output.
SHIFTED_HIDDEN_STATES: dict[str, str] = {
    "mamba": "output_hidden_states has no embeddings entry (index i is block i's output); checked against the "
             "shifted reference",
    "falcon_mamba": "as mamba: checked against output_hidden_states shifted by one",
    "mamba2": "as mamba: checked against output_hidden_states shifted by one",
    "rwkv": "as mamba: checked against output_hidden_states shifted by one",
}

N_LAYERS = 3
D_MODEL = 64
VOCAB = 256


def _truncate_per_layer(value: list | str, n_default: int) -> list | str:
    """Keep ``N_LAYERS`` entries of a per-layer pattern, covering each distinct kind first (attention + state space)."""
    items = list(value)
    chosen: list[int] = []
    for kind in dict.fromkeys(map(str, items)):
        if len(chosen) < N_LAYERS:
            chosen.append(next(i for i, x in enumerate(items) if str(x) == kind))
    for i in range(len(items)):
        if len(chosen) >= N_LAYERS:
            break
        if i not in chosen:
            chosen.append(i)
    picked = [items[i] for i in sorted(chosen)]
    return "".join(picked) if isinstance(value, str) else picked


def _shrink(values: dict[str, Any]) -> dict[str, Any]:
    """Overrides for one (sub-)config dict: known size keys set small, per-layer patterns truncated."""
    out: dict[str, Any] = {}
    n_default = next((values[k] for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
                      if isinstance(values.get(k), int)), None)
    for key, value in values.items():
        if key in _SIZES and (value is None or isinstance(value, int)) and not isinstance(value, bool):
            out[key] = min(value or 2, _SIZES[key]) if key in ("num_experts_per_tok", "moe_topk") else _SIZES[key]
        elif key in _SIZES and isinstance(value, list) and n_default and len(value) == n_default:
            out[key] = [_SIZES[key]] * N_LAYERS  # one size per layer
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            out[key] = {k: v for k, v in value.items() if int(k) < N_LAYERS}  # per-layer settings
        elif isinstance(value, dict) and key.endswith("_config"):
            # A typed sub-config is rebuilt from the whole dict; an untyped one (DBRX's) only from the changes.
            out[key] = {**value, **_shrink(value)} if value.get("model_type") else _shrink(value)
        elif key == "attn_layer_indices":
            out[key] = [1]
        elif (n_default and isinstance(value, list | str) and len(value) == n_default and n_default > N_LAYERS
              and any(hint in key for hint in _PER_LAYER_HINTS)):
            out[key] = _truncate_per_layer(value, n_default)
        elif key.endswith("_token_id") or key.endswith("_token_index"):
            # Special ids past the tiny vocabulary would index out of range.
            if isinstance(value, int) and value >= VOCAB:
                out[key] = VOCAB - 1 - (hash(key) % 8)
    if "kv_lora_rank" in values:
        # Multi-head latent attention expands keys/values to every query head.
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)
    return out


def tiny_config(model_type: str):
    """The default config of ``model_type`` with every known size shrunk (no download)."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    overrides = {**_shrink(config_class().to_dict()), **_EXTRA.get(model_type, {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_class(**overrides)


def build_tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A randomly initialised float32 causal LM of ``model_type`` in eval mode, from ``tiny_config``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    return model.eval()


def _reserved_ids(config: object) -> set[int]:
    """Token ids the config gives a special meaning (images, audio...), which plain text must avoid."""
    reserved: set[int] = set()
    stack = [config.to_dict()]
    while stack:
        values = stack.pop()
        for key, value in values.items():
            if isinstance(value, dict):
                stack.append(value)
            elif isinstance(key, str) and ("token" in key and ("id" in key or "index" in key)) and isinstance(value, int):
                reserved.add(value)
    return reserved


def text_ids(model: nn.Module, batch: int = 2, seq: int = 6, seed: int = 1) -> Tensor:
    """Random token ids that avoid the config's special ids."""
    reserved = _reserved_ids(model.config)
    vocab = [i for i in range(3, VOCAB) if i not in reserved]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(vocab), (batch, seq), generator=gen)
    return torch.tensor(vocab)[picks]


Status = Literal["pass", "skip", "fail"]


@dataclass(frozen=True)
class ArchResult:
    """Outcome of ``check_architecture`` for one model type.

    Attributes:
        model_type: the key in transformers' causal-LM mapping.
        status: "pass" (capture and steering exact), "skip" (cannot be built tiny offline / not decoder-only /
            unsupported by design) or "fail" (built, but steerlib's convention does not hold).
        reason: why, for "skip" and "fail".
        max_error: largest absolute difference seen between capture/steering and the reference.
    """

    model_type: str
    status: Status
    reason: str = ""
    max_error: float = 0.0


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {' '.join(lines[:2])}"
    return text[:160]


def check_model(model: nn.Module, ids: Tensor, *, shifted: bool = False, atol: float = 1e-5,
                rtol: float = 1e-4) -> float:
    """Assert steerlib's layer convention on ``model``; return the largest absolute error seen.

    Checks: ``record_residual`` at every layer equals ``output_hidden_states`` (at the top layer, the last block's
    output before the final norm); steering ``coef * v`` at each layer
    ``L`` < n changes ``output_hidden_states[L]`` by exactly ``coef * v`` and leaves earlier layers alone; steering
    at the last layer changes it to ``final_norm(block output + coef * v)``.

    Args:
        model: a tiny causal LM.
        ids: [batch, seq] token ids.
        shifted: the model's ``output_hidden_states`` lacks the embeddings entry (see ``SHIFTED_HIDDEN_STATES``);
            the reference is then ``[embeddings, hidden_states[0], ..., hidden_states[n - 2], hidden_states[n]]``.
        atol: absolute tolerance.
        rtol: relative tolerance.
    """
    from steerlib.core.arch import get_layout
    from steerlib.core.hooks import record_residual
    from steerlib.steering.steer import steer

    layout = get_layout(model)
    n = layout.n_layers
    worst = 0.0

    def close(got: Tensor, want: Tensor, what: str) -> None:
        nonlocal worst
        if got.shape != want.shape:
            raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        err = (got.float() - want.float()).abs()
        worst = max(worst, float(err.max()))
        limit = atol + rtol * want.float().abs()
        if bool((err > limit).any()):
            raise AssertionError(f"{what}: max abs error {float(err.max()):.3g}")

    with torch.no_grad():
        def hidden(out) -> tuple[Tensor, ...]:
            states = out.hidden_states
            if shifted:
                states = (model.get_input_embeddings()(ids), *states[: n - 1], states[n])
            return states

        def last_block_output() -> Tensor:
            raw: list[Tensor] = []

            def keep(_m: nn.Module, _a: tuple, out: object) -> None:
                raw.append(out[0] if isinstance(out, tuple) else out)

            handle = layout.blocks[-1].register_forward_hook(keep)
            try:
                model(ids)
            finally:
                handle.remove()
            return raw[0]

        want = hidden(model(ids, output_hidden_states=True))
        if len(want) != n + 1:
            raise AssertionError(f"output_hidden_states has {len(want)} entries for {n} blocks")
        with record_residual(model) as records:
            model(ids)
        residual = (*want[:n], last_block_output())
        for layer in range(n + 1):
            if len(records[layer]) != 1:
                raise AssertionError(f"layer {layer}: recorded {len(records[layer])} times in one forward")
            close(records[layer][0], residual[layer], f"capture at layer {layer}")
        vec = torch.randn(layout.d_model, generator=torch.Generator().manual_seed(2))
        coef = 0.5
        for layer in range(1, n + 1):
            with steer(model, vec, layers=layer, coef=coef):
                got = hidden(model(ids, output_hidden_states=True))
            for earlier in range(layer):
                close(got[earlier], want[earlier], f"steering at {layer}: layer {earlier} must not change")
            if layer < n:
                close(got[layer], want[layer] + coef * vec, f"steering at {layer}: shift of layer {layer}")
            elif layout.final_norm is not layout.blocks[-1]:
                close(got[n], layout.final_norm(residual[n] + coef * vec), f"steering at {n}: normed last layer")
            else:
                close(got[n], want[n] + coef * vec, f"steering at {n}: shift of the last layer")
    return worst


def check_architecture(model_type: str, cache: dict[str, nn.Module] | None = None) -> ArchResult:
    """Build ``model_type`` tiny and run ``check_model``; classify what goes wrong.

    Args:
        model_type: a key of transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``.
        cache: optional dict to keep built models in (so a test session builds each once).
    """
    from steerlib.core.arch import text_config

    try:
        config = tiny_config(model_type)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot be configured offline"
        return ArchResult(model_type, "skip", f"config cannot be built: {_first_line(exc)}")
    text = text_config(config)
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        return ArchResult(model_type, "skip", "encoder-decoder, not decoder-only")
    if getattr(text, "is_decoder", None) is False and hasattr(text, "add_cross_attention"):
        # BERT-style configs: bidirectional encoders whose causal-LM head needs is_decoder=True (GPT-NeoX also
        # carries is_decoder=False, but no cross-attention switch).
        return ArchResult(model_type, "skip", "BERT-style encoder (is_decoder=False by default), not a decoder-only LM")
    if not any(isinstance(getattr(text, key, None), int) for key in ("num_hidden_layers", "n_layer", "n_layers",
                                                                     "num_layers")):
        return ArchResult(model_type, "skip", "config gives no number of decoder layers (not a plain block stack)")
    try:
        model = cache.get(model_type) if cache is not None else None
        if model is None:
            model = build_tiny_model(model_type)
            if cache is not None:
                cache[model_type] = model
    except Exception as exc:  # noqa: BLE001
        return ArchResult(model_type, "skip", f"cannot be built tiny offline: {_first_line(exc)}")
    ids = text_ids(model)
    try:
        with torch.no_grad():
            model(ids)
    except Exception as exc:  # noqa: BLE001
        return ArchResult(model_type, "skip", f"text-only forward fails: {_first_line(exc)}")
    try:
        err = check_model(model, ids, shifted=model_type in SHIFTED_HIDDEN_STATES)
    except NotImplementedError as exc:
        return ArchResult(model_type, "skip", str(exc).splitlines()[0][:200])
    except Exception as exc:  # noqa: BLE001 - AssertionError from the checks, or anything the model raises
        return ArchResult(model_type, "fail", _first_line(exc))
    return ArchResult(model_type, "pass", SHIFTED_HIDDEN_STATES.get(model_type, ""), max_error=err)
