"""Run ``compile_model`` in a child process, off the reconcile loop.

``compile_in_subprocess`` (called by the EdgeModel reconciler; ``compile_async`` from asyncio
code) starts ``python -m controller.compile.worker``, sends one JSON request on stdin and reads
JSON lines back: ``{"progress": "..."}`` while it works, then ``{"report": {...}}`` or
``{"error": {...}}``. Errors come back as the same protos.errors types with a clear message, never
a traceback; a crash, a kill or a timeout becomes GiveUp with the tail of the child's stderr.
Vendor toolchains print freely, so the child moves their stdout to stderr and keeps a private
descriptor for the protocol.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from controller.compile.api import AllPrecisionsRejected, CompileReport, Progress, compile_model
from controller.compile.childproc import run_json_child
from controller.compile.deviceclass import AccuracySpec, DeviceClassSpec
from protos.errors import BackendUnavailable, EdgefleetError, GiveUp, Rejected, RetryLater

DEFAULT_TIMEOUT_S = 3600.0
_STDERR_TAIL = 2000


def _request(model: Path, *, device_class: DeviceClassSpec, precisions: list[str],
             validation: Path | None, accuracy: AccuracySpec | None,
             work_dir: Path) -> dict[str, Any]:
    return {"model": str(model), "device_class": {"name": device_class.name,
                                                  "spec": device_class.to_spec()},
            "precisions": list(precisions),
            "validation": str(validation) if validation is not None else None,
            "accuracy": accuracy.to_spec() if accuracy else None, "work_dir": str(work_dir)}


def _error_to_dict(e: BaseException) -> dict[str, Any]:
    d: dict[str, Any] = {"type": type(e).__name__, "message": str(e),
                         "reason": getattr(e, "reason", "error")}
    if isinstance(e, AllPrecisionsRejected):
        d["rejected"] = e.rejected
    if isinstance(e, BackendUnavailable):
        d["backend"] = e.backend
        d["detail"] = str(e).split(": ", 1)[-1]
    return d


def _error_from_dict(d: dict[str, Any]) -> EdgefleetError:
    t, msg, reason = d.get("type"), str(d.get("message", "")), str(d.get("reason", "error"))
    if t == "AllPrecisionsRejected":
        return AllPrecisionsRejected(msg, rejected=list(d.get("rejected", [])))
    if t == "BackendUnavailable":
        return BackendUnavailable(str(d.get("backend", "")), str(d.get("detail", msg)))
    if t == "Rejected":
        return Rejected(msg, reason=reason)
    if t == "RetryLater":
        return RetryLater(msg, reason=reason)
    return GiveUp(msg, reason=reason)


def compile_in_subprocess(model: Path, *, device_class: DeviceClassSpec, precisions: list[str],
                          validation: Path | None, accuracy: AccuracySpec | None,
                          work_dir: Path, progress: Progress | None = None,
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> CompileReport:
    """Same contract as ``compile_model``, run in a fresh ``python`` child process."""
    req = _request(model, device_class=device_class, precisions=precisions,
                   validation=validation, accuracy=accuracy, work_dir=work_dir)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    out = run_json_child([sys.executable, "-m", "controller.compile.worker"], req,
                         work_dir=Path(work_dir), timeout_s=timeout_s, on_progress=progress,
                         stderr_prefix=".worker-stderr.", stderr_tail_bytes=_STDERR_TAIL)
    result = out.final
    if result is None or not ("report" in result or "error" in result):
        if out.timed_out:
            raise GiveUp(f"compile of {Path(model).name} for {device_class.name} timed out "
                         f"after {timeout_s:g}s", reason="compile_timeout")
        raise GiveUp(f"compile worker exited with status {out.returncode} and no result: "
                     f"{out.stderr_tail}", reason="compile_crashed")
    if "error" in result:
        raise _error_from_dict(result["error"])
    return CompileReport.from_dict(result["report"])


async def compile_async(model: Path, *, device_class: DeviceClassSpec, precisions: list[str],
                        validation: Path | None, accuracy: AccuracySpec | None, work_dir: Path,
                        progress: Progress | None = None,
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> CompileReport:
    """``compile_in_subprocess`` without blocking the event loop."""
    return await asyncio.to_thread(
        compile_in_subprocess, model, device_class=device_class, precisions=precisions,
        validation=validation, accuracy=accuracy, work_dir=work_dir, progress=progress,
        timeout_s=timeout_s)


def main() -> int:
    """Child side: read one request on stdin, answer with JSON lines on the saved stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vendor prints go to stderr from now on
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        req = json.loads(sys.stdin.read())
        dc = DeviceClassSpec.from_spec(req["device_class"]["spec"],
                                       name=req["device_class"]["name"])
        acc = AccuracySpec.from_spec(req["accuracy"]) if req.get("accuracy") else None
        report = compile_model(Path(req["model"]), device_class=dc,
                               precisions=list(req["precisions"]),
                               validation=Path(req["validation"]) if req.get("validation") else None,
                               accuracy=acc, work_dir=Path(req["work_dir"]),
                               progress=lambda m: send({"progress": m}))
        send({"report": report.to_dict()})
    except EdgefleetError as e:
        send({"error": _error_to_dict(e)})
    except (ValueError, KeyError, TypeError) as e:
        send({"error": {"type": "Rejected", "reason": "bad_request",
                        "message": f"bad compile request: {type(e).__name__}: {e}"}})
    except Exception as e:  # last resort: a clear line, not a traceback
        send({"error": {"type": "GiveUp", "reason": "compile_failed",
                        "message": f"compile failed: {type(e).__name__}: {e}"}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
