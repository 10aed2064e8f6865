"""``geopose-ml``: a thin click layer over the package (SPEC §3), one module per stage.

``app`` holds the group and its error handling; importing the command modules registers their commands
on it. Nothing in the package imports ``cli``.
"""

from geopose_mlops.cli import data, models, services, training  # noqa: F401  (registers the commands)
from geopose_mlops.cli.app import EXIT_INTERRUPTED, main

__all__ = ["EXIT_INTERRUPTED", "main"]
