"""teachx: turn explanations into better models (IMPACTX and friends)."""

__version__ = "0.1.0"
