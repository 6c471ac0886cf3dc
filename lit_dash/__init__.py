"""lit_dash: Lightning-native RL for reasoning (GRPO family, DASH)."""

__version__ = "0.1.0"
