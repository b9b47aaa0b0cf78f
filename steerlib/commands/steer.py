"""``steerlib steer``: steered answers next to unsteered ones, a dose-response sweep, a calibrated cap or a
gated edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerlib.commands.common import fit_vectors
from steerlib.core import models
from steerlib.core.chat import format_prompt
from steerlib.core.checks import check_int, check_number, check_out_dir, check_text
from steerlib.core.loading import load_vectors, pick_layer
from steerlib.core.vectors import TraitVectors
from steerlib.steering.calibration import Calibration, Percentile, calibrated_cap, calibration_path
from steerlib.steering.dose import DoseResponse, dose_response
from steerlib.steering.generation import Generation, generate
from steerlib.steering.plan import SteerOp, parse_params, position_rule
from steerlib.steering.steer import When, build_ops, build_readout
from steerlib.traits.judges import make_judge
from steerlib.traits.library import TraitError, load_trait

__all__ = ["SteeredAnswers", "steer_file", "sweep_judge"]


def sweep_judge(trait: str):
    """The offline judge for a dose-response, where the trait has one (None otherwise)."""
    try:
        return make_judge("auto", load_trait(trait))
    except (TraitError, ValueError):
        return None


@dataclass(frozen=True)
class SteeredAnswers:
    """Answers to each prompt per coefficient (0 = unsteered), or a dose-response table for a sweep."""

    layer: int
    coefs: tuple[float, ...]
    answers: dict[float, list[Generation]] = field(default_factory=dict)
    dose: DoseResponse | None = None
    labels: dict[float, str] = field(default_factory=dict)


def steer_file(
    vectors_path: str | Path,
    prompts: Sequence[str],
    *,
    model_path: str | Path | None = None,
    layer: int | None = None,
    coef: float = 4.0,
    mode: str = "add",
    positions: str = "all",
    relative: bool = False,
    cap: tuple[float | None, float | None] | None = None,
    sweep: Sequence[float] | None = None,
    system: str | None = None,
    max_new_tokens: int = 48,
    plot: str | Path | None = None,
    cap_percentile: float | None = None,
    cap_side: str = "max",
    layers: Sequence[int] | None = None,
    when_vector: str | Path | None = None,
    when_above: float | None = None,
    when_below: float | None = None,
    latch: bool = False,
    params: Sequence[str] = (),
    capability_items: int | None = 4,
) -> SteeredAnswers:
    """Steered answers next to unsteered ones, or with ``sweep`` a dose-response over coefficients.

    ``params`` are the method's own parameters as ``NAME=VALUE`` texts (``plan.parse_params``).

    With ``cap_percentile`` the steered answers are capped at that percentile of the vectors' calibration
    (``steerlib calibrate``) over ``layers`` (default: ``layer``); ``cap_side="min"`` floors instead.
    With ``when_above``/``when_below`` the edit is gated on the projection on ``when_vector`` (default: the steering
    vectors) at the edit's layer, per token or, with ``latch``, for the rest of a response once it opens.
    Every argument is checked before the model is loaded; ``sweep=[]`` is an error, not a plain run.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        check_text(p, f"prompt {i}")
    if system is not None:
        check_text(system, "system prompt")
    method_params = parse_params(mode, params)  # registered methods and position rules check themselves
    position_rule(positions)  # first:N, window:A-B and marker:TEXT too
    check_number(coef, "coef")
    check_int(max_new_tokens, "max_new_tokens")
    if sweep is not None:
        if len(sweep) == 0:
            raise ValueError("sweep is empty: give the coefficients to compare, e.g. --sweep 0,2,4")
        for c in sweep:
            check_number(c, "sweep coefficient")
    if cap_percentile is None:
        # The op's own checks, on a stand-in vector: the method by its registered name with its fields (a cap
        # needs a bound), the position rule (first:N, window:A-B and marker:TEXT too).
        lo, hi = cap if cap is not None else (None, None)
        SteerOp(layer=1, vector=torch.ones(1), mode=mode, coef=coef, cap_min=lo, cap_max=hi, positions=positions,
                params=method_params)
    if plot is not None:
        check_out_dir(Path(plot).parent, "--plot folder")
    pct = calibration = None
    if cap_percentile is not None:
        if sweep is not None or any(b is not None for b in cap or ()):
            raise ValueError("--cap-percentile replaces --cap-min/--cap-max and cannot be combined with --sweep")
        pct = Percentile(cap_percentile, side=cap_side)  # type: ignore[arg-type]
        calibration = Calibration.load(calibration_path(vectors_path))
        for x in layers or ():
            calibration.value(x, pct.value)  # an uncalibrated layer fails before the model loads
    elif layers is not None:
        raise ValueError("--layers is for --cap-percentile; use --layer for a single steering layer")
    gated = when_above is not None or when_below is not None
    for bound in (when_above, when_below):
        if bound is not None:
            check_number(bound, "condition threshold")
    if (when_vector is not None or latch) and not gated:
        raise ValueError("--when-vector and --latch need --when-above and/or --when-below")
    if gated and (sweep is not None or cap_percentile is not None):
        raise ValueError("a condition (--when-above/--when-below) cannot be combined with --sweep or --cap-percentile")
    condition_source = load_vectors(when_vector) if when_vector is not None else None
    source = load_vectors(vectors_path)  # a damaged file fails before the model loads
    loaded = models.load_model(model_path)
    model, tok = loaded
    source = fit_vectors(source, vectors_path, model)
    if pct is not None:
        calibration.check_model(model, calibration_path(vectors_path))  # type: ignore[union-attr]
        chosen = list(layers) if layers else [pick_layer(source, layer)]
        ops = calibrated_cap(model, source, calibration, pct, chosen)  # type: ignore[arg-type]
        formatted = [format_prompt(tok, p, system) for p in prompts]
        trait = source.trait if isinstance(source, TraitVectors) else "trait"
        readout = build_readout(model, {trait: source}, [chosen[-1]])
        answers = {0.0: generate(model, tok, formatted, readout=readout, max_new_tokens=max_new_tokens),
                   1.0: generate(model, tok, formatted, steering=ops, readout=readout, max_new_tokens=max_new_tokens)}
        span = f"{chosen[0]}-{chosen[-1]}" if len(chosen) > 1 else str(chosen[0])
        label = f"cap {pct.side} at percentile {pct.value:g} over layers {span}"
        return SteeredAnswers(layer=chosen[-1], coefs=(0.0, 1.0), answers=answers,
                              labels={0.0: "unsteered", 1.0: label})
    layer = pick_layer(source, layer)
    formatted = [format_prompt(tok, p, system) for p in prompts]
    trait = source.trait if isinstance(source, TraitVectors) else "trait"
    readout = build_readout(model, {trait: source}, [layer])
    if sweep is not None:
        from steerlib.evaluation.report import capability_probe

        # Capability beside the trait: ``capability_items`` items of each kind of the shipped set (0: off).
        dose = dose_response(model, tok, formatted, source, layer, list(sweep), relative=relative, readout=readout,
                             max_new_tokens=max_new_tokens, judge=sweep_judge(trait), plot_path=plot,
                             capability=capability_probe(model, tok, capability_items))
        return SteeredAnswers(layer=layer, coefs=tuple(sweep), dose=dose)
    when = None
    labels = {}
    if gated:
        condition = fit_vectors(condition_source, when_vector, model) if condition_source is not None else source
        when = When(condition, when_above, when_below, latch)
        side = " and ".join(f"{name} {v:g}" for name, v in (("above", when_above), ("below", when_below))
                            if v is not None)
        labels[coef] = (f"{mode} coef={coef:g} layer={layer} when projection {side}"
                        f"{' (latched)' if latch else ''}")
    answers: dict[float, list[Generation]] = {}
    for c in (0.0, coef):
        ops = [] if c == 0 else build_ops(model, source, layer, c, mode=mode, positions=positions, cap=cap,
                                          relative=relative, when=when if c == coef else None, params=method_params)
        answers[c] = generate(model, tok, formatted, steering=ops, readout=readout, max_new_tokens=max_new_tokens)
    return SteeredAnswers(layer=layer, coefs=(0.0, coef), answers=answers, labels=labels)
