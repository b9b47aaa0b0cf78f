"""steerlib: extract, steer, monitor and flag character traits in language models.

The data flow reads straight through the modules:
prompts (``traits``, ``chat``) -> activations (``hooks``, ``capture``) -> trait vectors (``extract``,
``sweep``, ``vectors``) -> steering and monitoring (``steer``, ``generation``) -> flagging and drift
(``flag``, ``drift``, ``shift``).
"""

__version__ = "0.1.0"

from .arch import Layout, get_layout
from .capture import Activations, capture_activations
from .chat import format_messages, format_prompt
from .compiled import CompiledSteering
from .data_io import read_samples
from .dose import DoseResponse, dose_response
from .drift import Alert, DriftMonitor, monitor_conversations
from .extract import ExtractionConfig, ExtractionResult, extract_trait
from .flag import rank, score_dataset
from .generation import Generation, generate, stream
from .hooks import StopForward, record_residual
from .judges import CallableJudge, Judge, JudgeError, LexiconJudge, LLMJudge, SelfJudge, make_judge
from .models import LoadedModel, load_model
from .shift import FinetuningShift, finetuning_shift
from .steer import Monitor, ResidualEditor, SteerOp, build_monitor, build_ops, monitoring, steer
from .sweep import LayerSweep, layer_sweep
from .training import PreventativeSteeringCallback, lora_finetune, preventative_steering
from .trait_gen import generate_trait
from .traits import InstructionPair, Trait, TraitError, list_traits, load_trait
from .vectors import TraitVectors

__all__ = [
    "Activations",
    "Alert",
    "CallableJudge",
    "CompiledSteering",
    "DoseResponse",
    "DriftMonitor",
    "ExtractionConfig",
    "ExtractionResult",
    "FinetuningShift",
    "Generation",
    "InstructionPair",
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
    "SteerOp",
    "StopForward",
    "Trait",
    "TraitError",
    "TraitVectors",
    "build_monitor",
    "build_ops",
    "capture_activations",
    "dose_response",
    "extract_trait",
    "finetuning_shift",
    "format_messages",
    "format_prompt",
    "generate",
    "generate_trait",
    "get_layout",
    "layer_sweep",
    "list_traits",
    "load_model",
    "load_trait",
    "lora_finetune",
    "make_judge",
    "monitor_conversations",
    "monitoring",
    "preventative_steering",
    "rank",
    "read_samples",
    "record_residual",
    "score_dataset",
    "steer",
    "stream",
]
