"""waggle-trainer: train a student network on a Waggle node inside its free memory."""

from waggle_trainer import lean_import

__version__ = "0.1.0"

# TorchDynamo is loaded only when something compiles: 75 MiB less resident.
lean_import.install()
