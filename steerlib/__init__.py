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
from .dose import DoseResponse, dose_response
from .extract import ExtractionConfig, ExtractionResult, extract_trait
from .generation import Generation, generate, stream
from .hooks import StopForward, record_residual
from .judges import CallableJudge, Judge, JudgeError, LexiconJudge, LLMJudge, SelfJudge, make_judge
from .models import LoadedModel, load_model
from .steer import Monitor, ResidualEditor, SteerOp, build_monitor, build_ops, monitoring, steer
from .sweep import LayerSweep, layer_sweep
from .trait_gen import generate_trait
from .traits import InstructionPair, Trait, TraitError, list_traits, load_trait
from .vectors import TraitVectors

__all__ = [
    "Activations",
    "CallableJudge",
    "DoseResponse",
    "ExtractionConfig",
    "ExtractionResult",
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
    "format_messages",
    "format_prompt",
    "generate",
    "generate_trait",
    "get_layout",
    "layer_sweep",
    "list_traits",
    "load_model",
    "load_trait",
    "make_judge",
    "monitoring",
    "record_residual",
    "steer",
    "stream",
]
