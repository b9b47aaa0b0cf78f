"""Steering and per-token read-out that ``torch.compile(fullgraph=True)`` traces with no graph break.

The eager path (``steerlib.steering.steer.ResidualEditor``) decides in Python whether a pass is the prefill (by asking
the KV cache how long it is) and appends each read-out to a Python list. Both are fine eagerly, but under
``torch.compile`` the first is a data-dependent graph break and the second makes every step a new graph.
Here every decision is a tensor operation:

* prompt vs response is ``position_ids >= prompt_lengths[:, None]`` per token, where ``prompt_lengths`` [B]
  counts each row's real prompt tokens. transformers' ``generate`` numbers positions from each row's first
  real token (left padding gets 0), so a token is generated exactly when its position reaches the row's
  prompt length, during the prefill and during decoding alike;
* per-row coefficients are a [B, n_ops] tensor, and several add vectors at one layer are summed into one
  [B, d_model] shift when steering is installed;
* the read-out goes into a preallocated ``readout`` [max_steps + 1, B, n_layers, K] at step
  ``position - prompt_length + 1`` of each row's last token (step 0 is the prefill's last token, which
  predicts the first generated one, as in ``steerlib.steering.generation``). Writes past ``max_steps`` land in the
  extra last slot instead of out of bounds;
* the fused op runs as the custom op ``torch.ops.steerlib.steer_project`` (torch/Triton/CUDA inside),
  whose fake implementation lets the compiler place it; its inputs are validated once, at install.

Hooks are global state: while a ``CompiledSteering`` is installed, every forward pass of the model is steered.

Example:
    >>> with CompiledSteering(model, ops, readout, prompt_lengths=mask.sum(1), max_steps=32) as cs:
    ...     out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32,
    ...                          cache_implementation="static", compile_config=compile_config(model))
    >>> cs.projections(32)  # [B, 32, n_layers, K]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from steerlib.core.arch import Layout, get_layout
from steerlib.core.hooks import HookHandles
from steerlib.kernels import steer_project_inline, steer_project_op, validate_steer_inputs
from steerlib.steering.steer import SteerOp, TraitReadout


@dataclass(frozen=True)
class _FusedStep:
    """One call of the fused op: a single add vector (steer/alpha) or a cap (cap_dir and bounds)."""

    positions: str
    steer: Tensor | None = None  # [D] fp32
    alpha: float = 0.0
    cap_dir: Tensor | None = None  # [D] fp32 unit
    cap_min: float | None = None
    cap_max: float | None = None
    row_scale: Tensor | None = None  # [B] fp32 per-row coefficient (add) or mask weight (cap), or None


@dataclass(frozen=True)
class _ShiftStep:
    """Several add vectors at one layer summed into one per-row shift [B, D] (e.g. one vector per row)."""

    positions: str
    shift: Tensor  # [B, D] fp32


def compile_config(model: nn.Module, **overrides):
    """A transformers ``CompileConfig`` for steered decoding: ``fullgraph=True``, on CPU as well as GPU.

    transformers only compiles ``generate``'s decode step on accelerators unless the config's private
    ``_compile_all_devices`` flag is set; it is set here for CPU models (checked to exist first).

    Args:
        model: The model that will generate (its device picks the defaults).
        overrides: ``CompileConfig`` fields to change (``backend``, ``mode``, ``dynamic``...).

    Returns:
        A ``transformers.CompileConfig``.
    """
    from transformers import CompileConfig

    device = next(model.parameters()).device
    # CUDA graphs ("reduce-overhead") are what removes launch overhead on a GPU; on CPU they do not exist.
    options = {"fullgraph": True, "mode": "reduce-overhead" if device.type == "cuda" else "default"}
    options.update(overrides)
    config = CompileConfig(**options)
    if device.type not in ("cuda", "xpu"):
        if not hasattr(config, "_compile_all_devices"):
            raise RuntimeError(
                "this transformers version's CompileConfig has no _compile_all_devices flag, so generate() "
                "would not compile on CPU; use a GPU or a transformers version that has it (5.24 does)"
            )
        config._compile_all_devices = True
    return config


class CompiledSteering:
    """Installs tensor-driven steering and read-out hooks on a model's blocks; use as a context manager.

    All hooks are registered before the body runs, or none are; they are removed when the context exits,
    also when the body raises.

    Args:
        model: HF causal LM whose decoder blocks receive ``position_ids`` (transformers' decoder models do).
        ops: steering edits, as for ``ResidualEditor`` (add / ablate / cap; positions all / prompt / response).
        readout: traits to read out per generated token (``build_readout``), or None.
        prompt_lengths: [B] real (unpadded) prompt length of each row, e.g. ``attention_mask.sum(1)``.
        max_steps: tokens to be generated (size of the read-out buffer).
        row_coefs: [B, len(ops)] per-row coefficients, or None to use each op's ``coef`` for every row. For an
            add op the entry replaces ``coef``; for ablate/cap it scales the correction (1 = full, 0 = off).
        backend: backend of the fused op inside the custom op ("auto", "torch", "triton", "cuda"), or
            "inline": the same math as plain torch ops in the graph, which the compiler fuses with the block's
            own kernels (cheaper on CPU, where no CUDA graph hides the custom op's Python call).
    """

    def __init__(self, model: nn.Module, ops: Sequence[SteerOp] = (), readout: TraitReadout | None = None, *,
                 prompt_lengths: Tensor, max_steps: int, row_coefs: Tensor | None = None, backend: str = "auto"):
        self.model = model
        self.layout: Layout = get_layout(model)
        self.trait_readout = readout
        self.backend = backend
        param = next(model.parameters())
        self.device = param.device
        ops = list(ops)
        if not isinstance(prompt_lengths, Tensor) or prompt_lengths.dim() != 1 or prompt_lengths.numel() == 0:
            raise ValueError("prompt_lengths must be a non-empty 1-D tensor [batch] of real prompt lengths")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if backend not in ("auto", "torch", "triton", "cuda", "inline"):
            raise ValueError(f"backend must be one of auto, torch, triton, cuda, inline; got {backend!r}")
        self.batch = int(prompt_lengths.shape[0])
        self.max_steps = max_steps
        if row_coefs is not None:
            if tuple(row_coefs.shape) != (self.batch, len(ops)):
                raise ValueError(f"row_coefs must have shape [batch, n_ops] = [{self.batch}, {len(ops)}], "
                                 f"got {list(row_coefs.shape)}")
            row_coefs = row_coefs.detach().to(device=self.device, dtype=torch.float32)
            if not bool(torch.isfinite(row_coefs).all()):  # checked once here, never on the decode path
                raise ValueError("row_coefs contains NaN or inf values")
        self.prompt_lengths = prompt_lengths.detach().to(device=self.device, dtype=torch.long)
        self._rows = torch.arange(self.batch, device=self.device)
        self._steps = self._plan(ops, row_coefs)
        self._readout_dirs: dict[int, Tensor] = {}
        self._readout_index: dict[int, int] = {}
        self.buffer: Tensor | None = None
        if readout is not None:
            for i, layer in enumerate(readout.layers):
                layer = self.layout.check_layer(layer, allow_embeddings=False)
                dirs = readout.directions[layer].to(device=self.device, dtype=torch.float32).contiguous()
                validate_steer_inputs(self.layout.d_model, self.device, readout=dirs)
                self._readout_dirs[layer] = dirs
                self._readout_index[layer] = i
            k = len(readout.names)
            self.buffer = torch.zeros(max_steps + 1, self.batch, len(readout.layers), k, device=self.device)
            if self.device.type == "cuda":
                # A fixed address lets CUDA graphs write into this buffer instead of refusing a mutated input.
                torch._dynamo.mark_static_address(self.buffer)
        self._handles = HookHandles()

    def _plan(self, ops: list[SteerOp], row_coefs: Tensor | None) -> dict[int, list[_FusedStep | _ShiftStep]]:
        """Per layer, the steps to run in op order; consecutive adds with the same positions are merged."""
        d = self.layout.d_model
        grouped: dict[int, list[tuple[int, SteerOp]]] = {}
        for i, op in enumerate(ops):
            layer = self.layout.check_layer(op.layer, allow_embeddings=False)
            grouped.setdefault(layer, []).append((i, op))
        plans: dict[int, list[_FusedStep | _ShiftStep]] = {}
        for layer, items in grouped.items():
            steps: list[_FusedStep | _ShiftStep] = []
            run: list[tuple[int, SteerOp, Tensor]] = []  # consecutive add ops with the same positions
            for i, op in items:
                vec = op.vector.detach().to(device=self.device, dtype=torch.float32).contiguous()
                if op.mode == "add":
                    validate_steer_inputs(d, self.device, steer_vec=vec)
                    if run and run[-1][1].positions != op.positions:
                        steps.append(self._add_step(run, row_coefs))
                        run = []
                    run.append((i, op, vec))
                    continue
                if run:
                    steps.append(self._add_step(run, row_coefs))
                    run = []
                unit = vec / vec.norm()
                lo, hi = (0.0, 0.0) if op.mode == "ablate" else (op.cap_min, op.cap_max)
                validate_steer_inputs(d, self.device, cap_dir=unit, cap_min=lo, cap_max=hi)
                scale = row_coefs[:, i].contiguous() if row_coefs is not None else None
                steps.append(_FusedStep(op.positions, cap_dir=unit, cap_min=lo, cap_max=hi, row_scale=scale))
            if run:
                steps.append(self._add_step(run, row_coefs))
            plans[layer] = steps
        return plans

    def _add_step(self, run: list[tuple[int, SteerOp, Tensor]], row_coefs: Tensor | None) -> _FusedStep | _ShiftStep:
        """One step for consecutive add ops: the fused op for a single vector, else a summed per-row shift."""
        if len(run) == 1:
            i, op, vec = run[0]
            # The coefficient travels as a tensor even when it is one number: a Python float would be a graph
            # constant, and every new coefficient would compile a new graph.
            scale = (row_coefs[:, i].contiguous() if row_coefs is not None else
                     torch.full((self.batch,), float(op.coef), device=self.device))
            return _FusedStep(op.positions, steer=vec, alpha=1.0, row_scale=scale)
        if row_coefs is not None:
            coefs = row_coefs[:, [i for i, _, _ in run]]
        else:
            coefs = torch.tensor([[op.coef for _, op, _ in run]], device=self.device).expand(self.batch, -1)
        shift = coefs @ torch.stack([vec for _, _, vec in run])  # [B, n] @ [n, D] -> [B, D]
        return _ShiftStep(run[0][1].positions, shift.contiguous())

    def _make_hook(self, layer: int):
        steps = self._steps.get(layer, [])
        readout_dirs = self._readout_dirs.get(layer)
        readout_index = self._readout_index.get(layer, 0)
        prompt_lengths, rows, buffer = self.prompt_lengths, self._rows, self.buffer
        max_steps, backend, batch = self.max_steps, self.backend, self.batch

        def hook(_module: nn.Module, _args: tuple, kwargs: dict, output: object):
            hidden = output[0] if isinstance(output, tuple) else output
            b, t, width = hidden.shape
            if b != batch:
                raise RuntimeError(f"CompiledSteering was installed for batch {batch} but layer {layer} saw "
                                   f"batch {b}")
            position_ids = kwargs.get("position_ids")
            if not isinstance(position_ids, Tensor):
                raise RuntimeError(f"decoder block {layer - 1} was called without position_ids, so prompt and "
                                   "response tokens cannot be told apart from tensors; this model's decoder does "
                                   "not pass them to its blocks (use steerlib.steering.steer for it)")
            positions = position_ids.expand(b, t)
            response = positions >= prompt_lengths[:, None]  # [B, T] bool
            flat = hidden.reshape(b * t, width)
            proj = None
            for i, step in enumerate(steps):
                last = i == len(steps) - 1
                mask = None if step.positions == "all" else (response if step.positions == "response" else ~response)
                if isinstance(step, _ShiftStep):
                    shift = step.shift[:, None, :] if mask is None else mask[:, :, None] * step.shift[:, None, :]
                    flat = (flat.float().view(b, t, width) + shift).reshape(b * t, width).to(flat.dtype)
                    continue
                if step.row_scale is not None:
                    scale = step.row_scale[:, None].expand(b, t)
                    mask = scale if mask is None else scale * mask.float()
                row_mask = None if mask is None else mask.float().reshape(b * t)
                if backend == "inline":
                    flat, p = steer_project_inline(flat, step.steer, step.alpha, row_mask, step.cap_dir,
                                                   step.cap_min, step.cap_max, readout_dirs if last else None)
                else:
                    flat, p = steer_project_op(
                        flat, step.steer, step.alpha, row_mask, step.cap_dir, step.cap_min, step.cap_max,
                        readout_dirs if last else None, backend,
                    )
                if last and readout_dirs is not None:
                    proj = p
            if readout_dirs is not None:
                if proj is None:  # nothing steered last at this layer: read out only
                    proj = flat.float() @ readout_dirs.T
                step_index = (positions[:, -1] - prompt_lengths + 1).clamp(0, max_steps)  # [B]
                buffer.select(2, readout_index).index_put_((step_index, rows), proj.view(b, t, -1)[:, -1])
            if not steps:
                return None
            new_hidden = flat.view(b, t, width)
            return (new_hidden, *output[1:]) if isinstance(output, tuple) else new_hidden

        return hook

    def projections(self, steps: int | None = None) -> Tensor:
        """The read-out of the first ``steps`` generated tokens: [B, steps, n_readout_layers, K] float32 on CPU.

        Args:
            steps: tokens to return (default ``max_steps``).
        """
        if self.buffer is None:
            raise ValueError("no trait read-out was installed")
        steps = self.max_steps if steps is None else steps
        if not 0 <= steps <= self.max_steps:
            raise ValueError(f"steps must be within 0..{self.max_steps}, got {steps}")
        return self.buffer[:steps].transpose(0, 1).float().cpu()

    def __enter__(self) -> CompiledSteering:
        if torch._dynamo.config.skip_nnmodule_hook_guards:
            warnings.warn(
                "torch._dynamo.config.skip_nnmodule_hook_guards is True (torch's default): a model compiled "
                "before these hooks were installed keeps running its old graph without them, and one compiled "
                "with them keeps them after they are removed. Set it to False before compiling, or use "
                "steerlib.steering.compiled.generate_batch / generate(compile=True), which do.",
                RuntimeWarning, stacklevel=2,
            )
        if self.buffer is not None:
            self.buffer.zero_()
        layers = sorted(set(self._steps) | set(self._readout_dirs))
        with self._handles.registering() as handles:
            for layer in layers:
                block = self.layout.blocks[layer - 1]
                handles.add(block.register_forward_hook(self._make_hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        self._handles.remove()


def generate_batch(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, generate_kwargs: dict, *,
                   steering: Sequence[SteerOp] = (), readout: TraitReadout | None = None,
                   row_coefs: Tensor | None = None, compile_options: dict | None = None,
                   backend: str = "auto") -> tuple[Tensor, Tensor | None]:
    """One left-padded batch through ``model.generate`` with a static cache and a compiled decode step.

    transformers runs the prefill eagerly and the decode step through ``torch.compile(model.__call__,
    fullgraph=True)`` when the cache is static and the compile config allows the device; the steering hooks
    are traced into that graph. Graphs are guarded on the hooks installed, so a later call with other steering
    (or none) compiles its own graph rather than reusing a stale one; a call with the same ops and batch shape,
    whatever its coefficients, reuses it.

    Args:
        model: HF causal LM.
        input_ids: [B, T] left-padded prompt ids on the model's device.
        attention_mask: [B, T] 1 for real tokens.
        generate_kwargs: further ``generate`` arguments (``max_new_tokens`` is required).
        steering: steering ops.
        readout: read-out traits, or None.
        row_coefs: [B, len(steering)] per-row coefficients, or None.
        compile_options: ``CompileConfig`` overrides (e.g. ``{"backend": "aot_eager"}``).
        backend: fused-op backend.

    Returns:
        ``(generated ids [B, n] on CPU, read-out [B, n, n_readout_layers, K] or None)``.
    """
    max_new = generate_kwargs.get("max_new_tokens")
    if not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"generate_kwargs needs max_new_tokens >= 1, got {max_new!r}")
    kwargs = dict(generate_kwargs, cache_implementation="static",
                  compile_config=compile_config(model, **(compile_options or {})))
    # Guard compiled graphs on the hooks present: by default dynamo would reuse a graph traced with other
    # (or no) steering hooks. Graphs compiled here, steered or not, carry the guard.
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), \
            CompiledSteering(model, steering, readout, prompt_lengths=attention_mask.sum(1), max_steps=max_new,
                             row_coefs=row_coefs, backend=backend) as cs:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    new = out[:, input_ids.shape[1]:].cpu()
    return new, (cs.projections(new.shape[1]) if readout is not None else None)
