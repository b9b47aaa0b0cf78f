"""Steering and per-token read-out that ``torch.compile(fullgraph=True)`` traces with no graph break.

The eager path (``steerlib.steering.steer.ResidualEditor``) decides in Python whether a pass is the prefill (by asking
the KV cache how long it is) and appends each read-out to a Python list. Both are fine eagerly, but under
``torch.compile`` the first is a data-dependent graph break and the second makes every step a new graph.
Here every decision is a tensor operation:

* prompt vs response is ``position_ids >= prompt_lengths[:, None]`` per token, where ``prompt_lengths`` [B]
  counts each row's real prompt tokens. transformers' ``generate`` numbers positions from each row's first
  real token (left padding gets 0), so a token is generated exactly when its position reaches the row's
  prompt length, during the prefill and during decoding alike;
* the edits come from the one steering plan (``steerlib.steering.plan``): each batch row is a plan row with its
  own prompt length (and its own coefficients when ``row_coefs`` is given), and the per-token table index,
  coefficient and bounds are computed inside the graph from ``position_ids`` by the plan's ``token_args``;
* the read-out goes into a preallocated ``readout`` [max_steps + 1, B, n_layers, K] at step
  ``position - prompt_length + 1`` of each row's last token (step 0 is the prefill's last token, which
  predicts the first generated one, as in ``steerlib.steering.generation``). Writes past ``max_steps`` land in the
  extra last slot instead of out of bounds;
* the edit runs as the registered per-row op ``torch.ops.steerlib.steer_rows`` (torch/Triton/CUDA inside),
  whose fake implementation lets the compiler place it; values are checked once, when the plan is built, never
  inside the op;
* every tensor the hooks read (the plan's tables, per-row parameters and latch state, prompt lengths, read-out
  directions and buffer) is allocated once, before compiling, and marked as a static address
  (``torch._dynamo.mark_static_address``): ``mode="reduce-overhead"`` (CUDA graphs) then records them in place
  instead of copying them in each replay or skipping graphs for the ones the step mutates (latch state, read-out
  buffer), and nothing rebinds them while installed;
* under ``device_map="auto"`` (layers on several devices) each device has its own plan, prompt lengths, read-out
  directions and buffer (``steerlib.steering.devices``), and each layer's hook reads only its own device's.

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

import torch
from torch import Tensor, nn

from steerlib.core.arch import Layout, get_layout
from steerlib.core.compat import cache_keyword, output_cache
from steerlib.core.hooks import HookHandles, hook_residual
from steerlib.kernels import prepare_backend, resolve_backend
from steerlib.steering.devices import DevicePlans, layer_devices, plan_tensors
from steerlib.steering.plan import Edit, Support, check_supported, lower_ops
from steerlib.steering.readout import value_index
from steerlib.steering.steer import SteerOp, TraitReadout
from steerlib.steering.temperature import greedy_if_tiny


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
        row_coefs: [B, len(ops)] per-row coefficients, or None to use each op as given for every row. For a
            method with a strength (``SteeringMethod.strength``: ``add``'s coef) the entry replaces it; for one
            without (ablate, cap) it switches the edit on (1) or off (0) in that row (all or nothing).
        backend: backend of the fused op inside the custom op ("auto", "torch", "triton", "cuda"), or
            "inline": the same math as plain torch ops in the graph, which the compiler fuses with the block's
            own kernels (cheaper on CPU, where no CUDA graph hides the custom op's Python call).
    """

    # Positions come from ``position_ids`` inside the graph; nothing watches the generated text between steps,
    # so a marker rule would never fire: refused instead.
    SUPPORT = Support("the compiled path", markers=False)

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
        for op in ops:
            self.layout.check_layer(op.layer, allow_embeddings=False)
        # Per device: the plan, prompt lengths, batch rows, read-out directions and buffer of the layers there.
        self.layer_devices = layer_devices(self.layout, self.device)
        self.plans = DevicePlans(self.layout.d_model, self.layer_devices)
        self.plans.set_rows(self._row_edits(ops, row_coefs), prompt_lengths.tolist())
        self.plan = self.plans.for_layer(ops[0].layer) if ops else self.plans.first
        devices = list(self.plans.plans)
        self._prompt_lengths = {d: prompt_lengths.detach().to(device=d, dtype=torch.long) for d in devices}
        self._batch_rows = {d: torch.arange(self.batch, device=d) for d in devices}
        self.prompt_lengths = prompt_lengths.detach().to(device=self.device, dtype=torch.long)
        self._readout_dirs: dict[int, Tensor] = {}
        self._readout_index: dict[int, int] = {}
        self.buffers: dict[torch.device, Tensor] = {}
        if readout is not None:
            for i, layer in enumerate(readout.layers):
                layer = self.layout.check_layer(layer, allow_embeddings=False)
                device = self.layer_devices[layer]
                dirs = readout.directions[layer].to(device=device, dtype=torch.float32).contiguous()
                if not bool(torch.isfinite(dirs).all()):  # checked once here, never on the decode path
                    raise ValueError(f"read-out directions at layer {layer} contain NaN or inf values")
                self._readout_dirs[layer] = dirs
                self._readout_index[layer] = i
                if device not in self.buffers:
                    self.buffers[device] = torch.zeros(max_steps + 1, self.batch, len(readout.layers),
                                                       len(readout.names), device=device)
        for tensor in self.static_tensors():
            # A fixed, declared address: CUDA graphs read and write these in place (see the module docstring).
            torch._dynamo.mark_static_address(tensor)
        for device in devices:  # chosen and built now, not inside the first compiled step
            if backend == "auto":
                prepare_backend(device)
            elif backend != "inline":  # an explicit backend is loaded now, or refused with its reason
                resolve_backend(backend, torch.empty(0, self.layout.d_model, device=device))
        self._handles = HookHandles()

    def static_tensors(self) -> list[Tensor]:
        """Every tensor the installed hooks read or write, each allocated once before compiling."""
        tensors = [t for plan in self.plans.plans.values() for t in plan_tensors(plan)]
        tensors += [*self._prompt_lengths.values(), *self._batch_rows.values(), *self._readout_dirs.values(),
                    *self.buffers.values()]
        return list({id(t): t for t in tensors}.values())

    @property
    def buffer(self) -> Tensor | None:
        """The read-out buffer ``[max_steps + 1, B, n_readout_layers, K]`` (on the model's first device; with
        layers on several devices, each layer's slice gathered from its own device's buffer)."""
        if not self.buffers:
            return None
        if len(self.buffers) == 1:
            return next(iter(self.buffers.values()))
        first = next(iter(self.buffers.values()))
        out = torch.empty_like(first, device=self.device)
        for layer, i in self._readout_index.items():
            out[:, :, i].copy_(self.buffers[self.layer_devices[layer]][:, :, i])
        return out

    def _row_edits(self, ops: list[SteerOp], row_coefs: Tensor | None) -> list[list[Edit]]:
        """Each batch row's edits: the ops, with that row's coefficient as the method's strength where
        ``row_coefs`` gives one (a method without a strength: 0 off, 1 on)."""
        edits = lower_ops(ops)
        check_supported(edits, self.SUPPORT)
        if row_coefs is None:
            return [edits] * self.batch
        rows = []
        for b in range(self.batch):
            row = []
            for i, op in enumerate(ops):
                c = float(row_coefs[b, i])
                try:
                    scaled = op.with_strength(c)
                except ValueError as exc:
                    raise ValueError(f"row_coefs[{b}, {i}]: {exc}") from None
                if c != 0.0 or op.method.strength is not None:
                    row.append(edits[i] if scaled is op else lower_ops([scaled])[0])
            rows.append(row)
        return rows

    def _make_hook(self, layer: int):
        # Everything the hook reads lives on its layer's device and was marked static in __init__.
        device = self.layer_devices[layer]
        plan = self.plans.plans[device]
        steered = layer in plan.layers
        readout_dirs = self._readout_dirs.get(layer)
        readout_index = self._readout_index.get(layer, 0)
        prompt_lengths, rows, buffer = self._prompt_lengths[device], self._batch_rows[device], self.buffers.get(device)
        max_steps, backend, batch = self.max_steps, self.backend, self.batch

        def edit(flat: Tensor, shape: tuple[int, int], kwargs: dict) -> Tensor | None:
            b, t = shape
            if b != batch:
                raise RuntimeError(f"CompiledSteering was installed for batch {batch} but layer {layer} saw "
                                   f"batch {b}")
            position_ids = kwargs.get("position_ids")
            if not isinstance(position_ids, Tensor):
                raise RuntimeError(f"decoder block {layer - 1} was called without position_ids, so prompt and "
                                   "response tokens cannot be told apart from tensors; this model's decoder does "
                                   "not pass them to its blocks (use steerlib.steering.steer for it)")
            positions = position_ids.expand(b, t)
            # The plan's edit, as for every other path: token arguments, gates and latches inside the graph.
            flat, proj = plan.apply_traced(layer, flat, rows[:, None].expand(b, t).reshape(-1), positions.reshape(-1),
                                           readout_dirs, backend)
            if readout_dirs is not None:
                step_index = value_index(positions[:, -1], prompt_lengths).clamp(0, max_steps)  # [B]
                buffer.select(2, readout_index).index_put_((step_index, rows), proj.view(b, t, -1)[:, -1])
            return flat if steered else None

        return edit

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
        for buffer in self.buffers.values():
            buffer.zero_()  # in place: the address a compiled graph recorded stays valid
        layers = sorted(set(self.plans.layers) | set(self._readout_dirs))
        with self._handles.registering() as handles:
            for layer in layers:
                handles.add(hook_residual(self.layout, layer, self._make_hook(layer)))
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
        generate_kwargs: further ``generate`` arguments (``max_new_tokens`` is required); sampling at a temperature
            below ``steerlib.steering.temperature.MIN_TEMPERATURE`` (0.01) decodes greedily.
        steering: steering ops.
        readout: read-out traits, or None.
        row_coefs: [B, len(steering)] per-row coefficients, or None.
        compile_options: ``CompileConfig`` overrides (e.g. ``{"backend": "aot_eager"}``).
        backend: fused-op backend.

    Returns:
        ``(generated ids [B, n] on CPU, read-out [B, n + 1, n_readout_layers, K] or None)``: step ``j < n`` is
        paired with generated token ``j``, step ``n`` is read at the last generated token's own position.
    """
    max_new = generate_kwargs.get("max_new_tokens")
    if not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"generate_kwargs needs max_new_tokens >= 1, got {max_new!r}")
    kwargs = dict(greedy_if_tiny(generate_kwargs), compile_config=compile_config(model, **(compile_options or {})))
    if readout is None:
        kwargs["cache_implementation"] = "static"
    else:
        from transformers import StaticCache

        # generate's own static cache stops one slot short of the last sampled token; the closing pass below
        # feeds that token, so the cache gets the one extra slot.
        kwargs[cache_keyword(model)] = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + max_new)
    # Guard compiled graphs on the hooks present: by default dynamo would reuse a graph traced with other
    # (or no) steering hooks. Graphs compiled here, steered or not, carry the guard.
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), \
            CompiledSteering(model, steering, readout, prompt_lengths=attention_mask.sum(1), max_steps=max_new,
                             row_coefs=row_coefs, backend=backend) as cs:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, return_dict_in_generate=True,
                             **kwargs)
        new = out.sequences[:, input_ids.shape[1]:].cpu()
        if readout is None:
            return new, None
        # One eager pass over each row's last token gives that token's own read-out (see generation.py); it
        # lands in the buffer's step ``len(new)``.
        b, n = new.shape
        mask = torch.cat([attention_mask, attention_mask.new_ones((b, n))], dim=1)
        model(input_ids=out.sequences[:, -1:], attention_mask=mask, position_ids=(mask.sum(1, keepdim=True) - 1),
              cache_position=torch.tensor([mask.shape[1] - 1], device=mask.device), use_cache=True,
              **{cache_keyword(model): output_cache(out)})
    buffer = cs.buffer
    assert buffer is not None
    return new, buffer[:n + 1].transpose(0, 1).float().cpu()
