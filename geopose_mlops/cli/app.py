"""The ``geopose-ml`` group: the package's errors as one-line messages and exit codes, SIGTERM as Ctrl-C.

Every command exits 0 on success; on failure it prints one line naming the file or value at fault and
exits 1 (bad data or run-time failure) or 2 (bad arguments or configuration, nothing written); 130 when
interrupted.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click

from geopose_mlops.errors import ConfigError, GeoposeError

EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by a signal (128 + SIGINT)


class GeoposeGroup(click.Group):
    """A click group that turns the package's own errors into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context):  # noqa: D102
        try:
            return super().invoke(ctx)
        except ConfigError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)
        except GeoposeError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Error: interrupted; open runs were marked KILLED (continue with --resume RUN_ID)", err=True)
            sys.exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``kill``, a batch scheduler's stop) stops the command as Ctrl-C does.

    The ``KeyboardInterrupt`` unwinds through training and tuning, which mark their runs KILLED and
    their trials failed instead of leaving them RUNNING. (SIGKILL cannot be caught: runs stay RUNNING,
    and ``--resume`` / the study's heartbeats take over.)
    """
    import signal
    import threading

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group(cls=GeoposeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="geopose-mlops")
def main() -> None:
    """Geocentric-pose models from overhead imagery: data, tracked training, tuning, ensembles."""
