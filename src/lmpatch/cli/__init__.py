"""The ``lmpatch`` command line (typer + rich); see :mod:`lmpatch.cli.app`."""
from lmpatch.cli.app import app, main

__all__ = ["app", "main"]
