"""``lmpatch serve`` as a child process, for tests, benchmarks and scripts that need the
real command (its start-up, its ledger on disk, a kill) rather than an app in-process."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServerProcess"]

_READY = re.compile(r"at (http://\S+?)/? ")


@dataclass
class ServerProcess:
    """Start with :meth:`start`; ``url`` is known once it is ready. ``args`` go to ``lmpatch serve``."""

    ledger: Path
    token: str
    args: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    url: str = ""
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def start(self, timeout: float = 300.0) -> "ServerProcess":
        self.log = Path(self.ledger).with_name(Path(self.ledger).name + f".serve-{int(time.time() * 1000)}.log")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LMPATCH_TOKEN": self.token, "COLUMNS": "400", **self.env}
        cmd = [sys.executable, "-m", "lmpatch.cli", "serve", "--port", "0", "--ledger", str(self.ledger), *self.args]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.log.read_text(errors="replace")
            found = _READY.search(text)
            if found:
                self.url = found.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmpatch serve exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"lmpatch serve was not ready in {timeout} s:\n{self.log.read_text(errors='replace')[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGINT, as Ctrl-C: a clean shutdown (killed if it takes too long)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
