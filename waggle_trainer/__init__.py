"""waggle-trainer: train a student network on a Waggle node inside its free memory."""

__version__ = "0.1.0"
