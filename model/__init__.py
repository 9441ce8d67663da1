"""The charlm network: `ModelConfig` (every architecture knob) and `GPT`."""
from model.config import ModelConfig
from model.gpt import GPT, head_weights
from model.memory import SegmentMemory

__all__ = ["GPT", "ModelConfig", "SegmentMemory", "head_weights"]
