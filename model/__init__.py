"""The charlm network: `ModelConfig` (every architecture knob) and `GPT`."""
from model.config import ModelConfig
from model.gpt import GPT, head_weights

__all__ = ["GPT", "ModelConfig", "head_weights"]
