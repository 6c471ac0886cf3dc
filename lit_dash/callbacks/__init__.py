"""Callbacks: checkpoints, the exported model, weight sync to the engine, held-out evaluation, completion
samples, reward audit, timing profiles, the progress bar."""

from lit_dash.callbacks.checkpoint import StepCheckpoint
from lit_dash.callbacks.evaluation import MathEvaluation
from lit_dash.callbacks.export import ExportModel
from lit_dash.callbacks.progress import RolloutProgress
from lit_dash.callbacks.reward_audit import RewardAudit
from lit_dash.callbacks.samples import CompletionSamples
from lit_dash.callbacks.timing import TimingProfile
from lit_dash.callbacks.weight_sync import WeightSync

__all__ = [
    "CompletionSamples",
    "ExportModel",
    "MathEvaluation",
    "RewardAudit",
    "RolloutProgress",
    "StepCheckpoint",
    "TimingProfile",
    "WeightSync",
]
