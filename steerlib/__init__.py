"""steerlib: extract, steer, monitor and flag character traits in language models.

The folders read as the data flow, each layer importing only from those before it (checked by import-linter):
``core`` (models, residual stream, capture, vectors) -> ``store`` (data files, results, plots) -> ``traits``
(definitions, judges) -> ``steering`` (edits and per-token read-out) -> ``extraction`` (trait vectors) ->
``monitoring`` (drift) and ``finetuning`` (flagging, shift, preventative steering) -> ``serve`` -> ``commands``
(path -> object wiring, one module per command) -> ``cli``. The fused kernels are ``steerlib.kernels`` (the
top-level ``kernels/``).

The names below are imported on first use (PEP 562): ``import steerlib`` loads nothing but this table, so
``import steerlib.kernels`` (which imports nothing else of steerlib) or ``from steerlib import TraitVectors``
pays only for what it uses; transformers, scikit-learn, peft and triton are loaded by the modules that need
them, when they are first asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "steerlib.core.arch": ("Layout", "get_layout"),
    "steerlib.core.capture": ("Activations", "capture_activations"),
    "steerlib.core.chat": ("format_messages", "format_prompt"),
    "steerlib.core.gguf_vectors": ("export_gguf", "read_control_vector"),
    "steerlib.core.hooks": ("StopForward", "record_residual"),
    "steerlib.core.loading": ("load_vectors", "pick_layer"),
    "steerlib.core.models": ("LoadedModel", "load_model"),
    "steerlib.core.vector_imports": ("load_persona_vectors", "load_saklas_profile"),
    "steerlib.core.vectors": ("TraitVectors",),
    "steerlib.core.version": ("__version__",),
    "steerlib.store.samples": ("read_samples",),
    "steerlib.traits.generate": ("generate_trait",),
    "steerlib.traits.judges": ("CallableJudge", "Judge", "JudgeError", "LexiconJudge", "LLMJudge", "SelfJudge",
                               "make_judge"),
    "steerlib.traits.library": ("InstructionPair", "Trait", "TraitError", "list_traits", "load_trait"),
    "steerlib.steering.calibration": ("Calibration", "Percentile", "calibrate", "calibrated_cap"),
    "steerlib.steering.compiled": ("CompiledSteering",),
    "steerlib.steering.compose": ("Component", "compose"),
    "steerlib.steering.dose": ("DoseResponse", "dose_response"),
    "steerlib.steering.generation": ("Generation", "generate", "stream"),
    "steerlib.steering.plan": ("Condition", "FirstGenerated", "FromMarker", "GeneratedWindow", "Lowered",
                               "PositionRule", "SteeringMethod", "SteeringNotSupported", "Support", "register_method",
                               "position_rule", "register_positions", "unit"),
    "steerlib.steering.steer": ("ResidualEditor", "SteerOp", "TraitReadout", "When", "build_ops", "build_readout",
                                "read_out", "steer"),
    "steerlib.extraction.extract": ("ExtractionConfig", "ExtractionResult", "extract_trait"),
    "steerlib.extraction.sweep": ("LayerSweep", "layer_sweep"),
    "steerlib.evaluation.capability": ("Capability", "CapabilityProbe", "load_capability_set"),
    "steerlib.evaluation.inventory": ("Inventory", "InventoryMatrix", "InventoryResult", "administer",
                                      "inventory_matrix"),
    "steerlib.evaluation.prompt_shift": ("ShiftCheck", "prompt_shift"),
    "steerlib.evaluation.report": ("write_report",),
    "steerlib.finetuning.flag.report": ("rank",),
    "steerlib.finetuning.flag.scoring": ("score_dataset",),
    "steerlib.finetuning.shift": ("FinetuningShift", "finetuning_shift"),
    "steerlib.finetuning.training": ("PreventativeSteeringCallback", "lora_finetune", "preventative_steering"),
    "steerlib.monitoring.conversations": ("monitor_conversations",),
    "steerlib.monitoring.drift": ("Alert", "DriftMonitor"),
    "steerlib.core.sae_format": ("SparseAutoencoder", "load_sae"),
    "steerlib.sae.train": ("SaeTrainConfig", "train_sae"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBPACKAGES = ("cli", "commands", "core", "evaluation", "extraction", "finetuning", "kernels", "monitoring", "sae",
                "serve", "steering", "store", "traits")
_RENAMED = {"Monitor": "TraitReadout", "build_monitor": "build_readout"}
"""The first release's names (the read-out was called a monitor). ``steerlib.monitoring``, the old name of
``read_out``, is the ``steerlib.monitoring`` package, which stays callable with the same warning."""

__all__ = sorted(name for name in _WHERE if name != "__version__")


def __getattr__(name: str) -> Any:
    """Import a public name, a subpackage or (with a DeprecationWarning) an old name on first use (PEP 562)."""
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _RENAMED:
        from steerlib.core.renamed import warn_renamed

        warn_renamed(f"steerlib.{name}", f"steerlib.{_RENAMED[name]}")
        return __getattr__(_RENAMED[name])
    raise AttributeError(f"module 'steerlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))
