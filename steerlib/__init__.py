"""steerlib: extract, steer, monitor and flag character traits in language models.

The folders read as the data flow, each layer importing only from those before it (checked by import-linter):
``core`` (models, residual stream, capture, vectors) -> ``store`` (data files, results, plots) -> ``traits``
(definitions, judges) -> ``steering`` (edits and per-token read-out) -> ``extraction`` (trait vectors) ->
``monitoring`` (drift) and ``finetuning`` (flagging, shift, preventative steering) -> ``serve`` -> ``jobs``
(path -> object wiring) -> ``cli``. The fused kernels are ``steerlib.kernels`` (the top-level ``kernels/``).
"""

from steerlib.core.arch import Layout, get_layout
from steerlib.core.capture import Activations, capture_activations
from steerlib.core.chat import format_messages, format_prompt
from steerlib.core.gguf_vectors import export_gguf, read_control_vector
from steerlib.core.hooks import StopForward, record_residual
from steerlib.core.loading import load_vectors, pick_layer
from steerlib.core.models import LoadedModel, load_model
from steerlib.core.vector_imports import load_persona_vectors, load_saklas_profile
from steerlib.core.vectors import TraitVectors
from steerlib.core.version import __version__ as __version__
from steerlib.evaluation.inventory import (
    Inventory,
    InventoryMatrix,
    InventoryResult,
    administer,
    inventory_matrix,
)
from steerlib.evaluation.prompt_shift import ShiftCheck, prompt_shift
from steerlib.evaluation.report import write_report
from steerlib.extraction.extract import ExtractionConfig, ExtractionResult, extract_trait
from steerlib.extraction.sweep import LayerSweep, layer_sweep
from steerlib.finetuning.flag.report import rank
from steerlib.finetuning.flag.scoring import score_dataset
from steerlib.finetuning.shift import FinetuningShift, finetuning_shift
from steerlib.finetuning.training import PreventativeSteeringCallback, lora_finetune, preventative_steering
from steerlib.monitoring.conversations import monitor_conversations
from steerlib.monitoring.drift import Alert, DriftMonitor
from steerlib.steering.calibration import Calibration, Percentile, calibrate, calibrated_cap
from steerlib.steering.compiled import CompiledSteering
from steerlib.steering.compose import Component, compose
from steerlib.steering.dose import DoseResponse, dose_response
from steerlib.steering.generation import Generation, generate, stream
from steerlib.steering.steer import (
    Monitor,
    ResidualEditor,
    SteerOp,
    TraitReadout,
    build_monitor,
    build_ops,
    build_readout,
    monitoring,
    read_out,
    steer,
)
from steerlib.store.samples import read_samples
from steerlib.traits.generate import generate_trait
from steerlib.traits.judges import (
    CallableJudge,
    Judge,
    JudgeError,
    LexiconJudge,
    LLMJudge,
    SelfJudge,
    make_judge,
)
from steerlib.traits.library import InstructionPair, Trait, TraitError, list_traits, load_trait

__all__ = [
    "Activations",
    "Alert",
    "Calibration",
    "Component",
    "Percentile",
    "calibrate",
    "calibrated_cap",
    "compose",
    "CallableJudge",
    "CompiledSteering",
    "DoseResponse",
    "DriftMonitor",
    "ExtractionConfig",
    "ExtractionResult",
    "FinetuningShift",
    "Generation",
    "InstructionPair",
    "Inventory",
    "InventoryMatrix",
    "InventoryResult",
    "Judge",
    "JudgeError",
    "LLMJudge",
    "LayerSweep",
    "Layout",
    "LexiconJudge",
    "LoadedModel",
    "Monitor",
    "PreventativeSteeringCallback",
    "ResidualEditor",
    "SelfJudge",
    "ShiftCheck",
    "SteerOp",
    "StopForward",
    "Trait",
    "TraitError",
    "TraitReadout",
    "TraitVectors",
    "administer",
    "build_monitor",
    "build_ops",
    "build_readout",
    "capture_activations",
    "dose_response",
    "export_gguf",
    "extract_trait",
    "finetuning_shift",
    "format_messages",
    "format_prompt",
    "generate",
    "generate_trait",
    "get_layout",
    "inventory_matrix",
    "layer_sweep",
    "list_traits",
    "load_model",
    "load_persona_vectors",
    "load_saklas_profile",
    "load_trait",
    "load_vectors",
    "lora_finetune",
    "make_judge",
    "monitor_conversations",
    "pick_layer",
    "monitoring",
    "preventative_steering",
    "prompt_shift",
    "rank",
    "read_control_vector",
    "read_out",
    "read_samples",
    "record_residual",
    "score_dataset",
    "steer",
    "stream",
    "write_report",
]
