"""Run a child process that speaks JSON lines: one request on stdin, messages on stdout.

The child sends ``{"progress": "..."}`` while it works and then one final message (anything
without a ``progress`` key). The child's stderr goes to a temp file in ``work_dir`` so a crash
can be explained with its tail; a watchdog kills the child after ``timeout_s``. Used by
controller.compile.worker (compile in a fresh interpreter) and controller.compile.rknn (the
rknn-toolkit2 venv's python running rknn_worker.py).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ChildOutcome:
    """What came back: the final message (None if the child sent none) and why."""

    final: dict[str, Any] | None
    returncode: int
    timed_out: bool           # the watchdog killed the child before its final message
    stderr_tail: str          # the end of its stderr, when final is None


def run_json_child(argv: list[str], request: dict[str, Any], *, work_dir: Path,
                   timeout_s: float, on_progress: Callable[[str], None] | None = None,
                   stderr_prefix: str = ".child-stderr.",
                   stderr_tail_bytes: int = 2000) -> ChildOutcome:
    """Start ``argv``, send ``request``, relay progress, return the final message."""
    with tempfile.TemporaryFile(dir=work_dir, prefix=stderr_prefix) as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, bufsize=1)
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        final: dict[str, Any] | None = None
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(request))
            proc.stdin.close()
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if "progress" in msg:
                    if on_progress is not None:
                        on_progress(str(msg["progress"]))
                else:
                    final = msg
            rc = proc.wait()
        finally:
            timed_out = not timer.is_alive() and final is None
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        tail = ""
        if final is None:
            err.seek(0)
            tail = err.read()[-stderr_tail_bytes:].decode(errors="replace").strip()
    return ChildOutcome(final, rc, timed_out, tail)
