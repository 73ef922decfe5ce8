"""``lmpatch serve``: the model behind an OpenAI-compatible API that takes edits live.

Loads the model, rebuilds its state from the ledger (``--ledger DIR``), and serves until
interrupted. The ready line on stderr gives the URL and where the write token is.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from lmpatch.cli.console import err, notice
from lmpatch.cli.models import load
from lmpatch.cli.options import Settings, check_file
from lmpatch.errors import LmpatchError

DEFAULT_LEDGER = Path("lmpatch-ledger")


def serve(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free one)."),
    ledger: Path = typer.Option(DEFAULT_LEDGER, "--ledger", help="Folder of the edit ledger and its patch files."),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file", help="File holding the bearer token for writes (default: $LMPATCH_TOKEN, "
        "else a random token kept in LEDGER/token)."),
    protect_reads: bool = typer.Option(False, "--protect-reads", help="Reads need the token too."),
    max_body_mb: float = typer.Option(1.0, "--max-body-mb", min=0.001, help="Largest JSON body accepted."),
    max_upload_mb: float = typer.Option(1024.0, "--max-upload-mb", min=0.001, help="Largest patch upload accepted."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, max=256, help="Most requests decoded together."),
) -> None:
    """Serve the model (OpenAI-compatible) and take edits live, kept in a durable ledger."""
    import uvicorn

    from lmpatch.serve.app import create_app
    from lmpatch.serve.service import Service, ServiceConfig

    token = _token(token_file)
    _check_port(host, port)  # before the model loads: a busy port is the commonest mistake
    settings: Settings = ctx.obj
    loaded, _ = load(settings, model, chat=False, show=True)
    config = ServiceConfig(ledger=ledger, token=token, protect_reads=protect_reads,
                           max_body_bytes=int(max_body_mb * 2**20), max_upload_bytes=int(max_upload_mb * 2**20), max_batch=max_batch)
    service = Service(loaded, config)
    where = "LMPATCH_TOKEN" if os.environ.get("LMPATCH_TOKEN") and not token_file else (
        str(token_file) if token_file else str(ledger / "token"))
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    started = server.startup

    async def startup(sockets=None):
        await started(sockets)
        bound = server.servers[0].sockets[0].getsockname() if server.servers else (host, port)
        notice(f"lmpatch serving {loaded.name} at http://{bound[0]}:{bound[1]}/ "
               f"(generation {service.state.generation}, {len(service.ledger.live())} edit(s) live; "
               f"ledger {ledger}; write token in {where})")

    server.startup = startup
    try:
        server.run()
    finally:
        service.close()
        err().print("lmpatch serve stopped", style="dim")


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LmpatchError(f"Cannot bind to host {host!r}: {exc.strerror}.") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise LmpatchError(f"Cannot listen on {host}:{port} ({exc.strerror}); choose another --port "
                               "(0 picks a free one).") from exc


def _token(token_file: Path | None) -> str | None:
    if token_file is not None:
        text = check_file(token_file, "Token file").read_text(encoding="utf-8").strip()
        if not text:
            raise LmpatchError(f"Token file '{token_file}' is empty.")
        return text
    return os.environ.get("LMPATCH_TOKEN") or None
