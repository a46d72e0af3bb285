"""``edgefleet rollout status|pause|resume|abort|retry|undo NAME [-n NAMESPACE]``, like kubectl rollout.

Hooked into controller/cli.py by ``add_rollout_parser(sub)``. The verbs POST to
``/api/v1/namespaces/{ns}/edgerollouts/{name}/actions/{verb}`` (controller/api/rollouts.py),
which changes the EdgeRollout's spec (controller/reconcile/verbs.py); ``status`` reads
``GET /api/v1/rollouts/{ns}/{name}`` and prints the status the controller wrote
(``format_status``); ``status --watch`` re-prints it when it changes and exits 0 once the
rollout is Complete, 1 when it is Aborted, its Degraded condition is True for a failed gate,
or ``--timeout`` passes. Errors are one ``error: ...`` line (controller/cli.py main); a closed
pipe ends the output quietly (exit 141), Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from protos.errors import Rejected

VERB_HELP = {
    "status": "print the rollout's status (--watch: until it completes or fails)",
    "pause": "spec.paused=true: no new device starts updating",
    "resume": "spec.paused=false, spec.aborted=false (spec.rollbackTo stays)",
    "abort": "spec.aborted=true: stop offering, return updated devices to their previous engine",
    "retry": "spec.retry+1: re-offer failed/stalled devices, re-run a failed wave gate",
    "undo": "spec.rollbackTo={version: N}: ship an earlier version (default "
            "status.previousVersion)",
}
DONE = {"pause": "paused", "resume": "resumed", "abort": "aborted", "retry": "retried",
        "undo": "rolled back"}
FAILED_GATE_REASONS = {"GateFailed", "HealthGateFailed"}
COUNTS = {"targeted": "targeted", "updated": "updated", "failed": "failed",
          "stalled": "stalled", "superseded": "superseded", "pending": "pending",
          "inProgress": "in progress", "backedOut": "backed out"}
EXIT_BROKEN_PIPE = 141


def add_rollout_parser(sub: Any) -> None:
    """Add ``rollout`` and its verbs to the ``edgefleet`` subcommands (``sub``)."""
    ro = sub.add_parser("rollout", help="operate a rollout: status | pause | resume | abort | "
                                        "retry | undo NAME [-n NAMESPACE]",
                        description="Each verb but status changes the EdgeRollout's spec (in "
                                    "cluster mode: use the kubectl patch the error names). "
                                    "resume keeps spec.rollbackTo; remove it (re-apply the "
                                    "YAML) to ship the current version again.")
    verbs = ro.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in VERB_HELP.items():
        p = verbs.add_parser(verb, help=text, description=text)
        p.add_argument("name", metavar="NAME", help="EdgeRollout name, or NAMESPACE/NAME")
        p.add_argument("-n", "--namespace", default="", help="default: default")
        if verb == "status":
            p.add_argument("-w", "--watch", action="store_true",
                           help="re-print on change; exit 0 when Complete, 1 when Aborted or "
                                "a wave gate failed")
            p.add_argument("--timeout", type=float, default=0.0, metavar="S",
                           help="--watch: give up (exit 1) after S seconds (0: never)")
            p.add_argument("--interval", type=float, default=2.0, metavar="S",
                           help="--watch: seconds between polls")
            p.add_argument("-o", "--output", choices=["json"])
        if verb == "undo":
            p.add_argument("--to-version", type=int, default=None, metavar="N",
                           help="the earlier model version to ship (default: "
                                "status.previousVersion)")
    ro.set_defaults(func=run_rollout)


def _target(args: argparse.Namespace) -> tuple[str, str]:
    name, ns = str(args.name), str(args.namespace or "")
    if "/" in name:
        given, _, name = name.partition("/")
        if ns and ns != given:
            raise Rejected(f"{args.name}: namespace {given!r} conflicts with -n {ns}",
                           reason="bad_arg")
        ns = given
    if not name:
        raise Rejected("rollout: give the EdgeRollout NAME", reason="bad_arg")
    return ns or "default", name


def run_rollout(args: argparse.Namespace) -> int:
    """Entry point of ``edgefleet rollout VERB``; returns the exit code."""
    from controller.cli import _server
    from controller.cli_client import client

    ns, name = _target(args)
    try:
        with client(_server(args)) as c:
            if args.verb == "status":
                return _status(c, ns, name, args)
            return _verb(c, ns, name, args)
    except BrokenPipeError:
        # the reader went away (`... | head`): no traceback, no second error at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _verb(c: Any, ns: str, name: str, args: argparse.Namespace) -> int:
    from controller.cli_client import rollout_action

    info = rollout_action(c, ns, name, args.verb, to_version=getattr(args, "to_version", None))
    if info.get("action") == "unchanged":
        print(info.get("message") or f"edgerollout.edgefleet.io/{name} unchanged", flush=True)
        return 0
    spec = info.get("spec") or {}
    extra = ""
    if args.verb == "retry":
        extra = f" (spec.retry={spec.get('retry')})"
    elif args.verb == "undo":
        extra = f" to version {(spec.get('rollbackTo') or {}).get('version')}"
    print(f"edgerollout.edgefleet.io/{name} {DONE[args.verb]}{extra}", flush=True)
    return 0


def _status(c: Any, ns: str, name: str, args: argparse.Namespace) -> int:
    from controller.cli_client import get_rollout

    if not args.watch:
        view = get_rollout(c, ns, name)
        text = (json.dumps(view.get("status") or {}, indent=2, sort_keys=True)
                if args.output == "json" else format_status(view))
        print(text, flush=True)
        return 0
    return _watch(c, ns, name, timeout_s=args.timeout, interval_s=max(0.05, args.interval),
                  as_json=args.output == "json")


def _watch(c: Any, ns: str, name: str, *, timeout_s: float, interval_s: float,
           as_json: bool) -> int:
    import httpx

    from controller.cli_client import ServerError, get_rollout

    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    shown, view, unreachable = "", None, False
    while True:
        try:
            view = get_rollout(c, ns, name)
            unreachable = False
        except (httpx.TransportError, ServerError) as e:   # a restarting controller: wait
            if isinstance(e, ServerError) and e.status < 500:
                raise
            if not unreachable:
                print(f"warning: cannot reach the controller ({e}); still watching",
                      file=sys.stderr, flush=True)
            unreachable = True
        if view is not None:
            text = (json.dumps(view.get("status") or {}, sort_keys=True) if as_json
                    else format_status(view))
            if text != shown:
                print(("" if not shown or as_json else "\n") + text, flush=True)
                shown = text
            outcome = watch_outcome(view)
            if outcome is not None:
                _finish(view, outcome)
                return outcome
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            phase = ((view or {}).get("status") or {}).get("phase") or "unknown"
            print(f"error: timed out after {timeout_s:g}s waiting for EdgeRollout {ns}/{name} "
                  f"to complete (phase {phase})", file=sys.stderr, flush=True)
            return 1
        time.sleep(interval_s if deadline is None else max(0.0, min(interval_s, deadline - now)))


def _finish(view: dict[str, Any], outcome: int) -> None:
    key = f"{view.get('namespace') or 'default'}/{view.get('name', '')}"
    if outcome == 0:
        print(f"edgerollout {key} successfully rolled out", flush=True)
        return
    status = view.get("status") or {}
    degraded = _condition(status, "Degraded") or {}
    why = ("aborted" if status.get("phase") == "Aborted" else
           f"gate failed ({degraded.get('reason')})")
    msg = str(status.get("message") or degraded.get("message") or "")
    print(f"error: EdgeRollout {key} {why}" + (f": {msg}" if msg else ""), file=sys.stderr,
          flush=True)


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == kind:
            return cond
    return None


def watch_outcome(view: dict[str, Any]) -> int | None:
    """0 when the rollout is Complete, 1 when Aborted or a wave gate failed, else None.

    A status computed for an older generation (the controller has not seen the latest spec
    change yet, e.g. right after ``undo``) decides nothing.
    """
    status = view.get("status") or {}
    observed, generation = status.get("observedGeneration"), view.get("generation")
    if isinstance(observed, int) and isinstance(generation, int) and observed < generation:
        return None
    if status.get("phase") == "Complete":
        return 0
    if status.get("phase") == "Aborted":
        return 1
    degraded = _condition(status, "Degraded") or {}
    if str(degraded.get("status")) == "True" and degraded.get("reason") in FAILED_GATE_REASONS:
        return 1
    return None


def _signals(value: Any) -> str:
    """A gate's signals on one line: ``name=value, ...`` for a mapping or a list of them."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
    if isinstance(value, list):
        parts = []
        for item in value:
            if isinstance(item, dict) and "name" in item:
                rest = {k: v for k, v in item.items() if k != "name"}
                val = rest.pop("value", None) if "value" in rest else None
                text = f"{item['name']}={_compact(val)}" if val is not None else str(item["name"])
                if rest:
                    text += f" ({', '.join(f'{k}={_compact(v)}' for k, v in rest.items())})"
                parts.append(text)
            else:
                parts.append(_compact(item))
        return ", ".join(parts)
    return _compact(value)


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def format_status(view: dict[str, Any]) -> str:
    """The rollout status as ``edgefleet rollout status`` prints it.

    ``view`` is what ``GET /api/v1/rollouts/{ns}/{name}`` answers (namespace, name,
    generation, spec, status); only the spec's model, version and operator fields and the
    status the controller wrote are read.
    """
    from controller.cli_client import table

    ns, name = view.get("namespace") or "default", view.get("name", "")
    spec, status = view.get("spec") or {}, view.get("status") or {}
    if not status:
        return f"EdgeRollout {ns}/{name}: no status yet (the controller has not reconciled it)"
    lines = [f"EdgeRollout {ns}/{name}: {status.get('phase') or 'unknown'}"]
    version = f"model {spec.get('model') or '-'}"
    if status.get("version") is not None:
        version += f", version {status['version']}"
    revision = status.get("revision")
    if isinstance(revision, int) and revision > 0:
        version += f" (revision {revision})"
    lines.append(f"  {version}")
    if status.get("currentWave"):
        lines.append(f"  wave: {status['currentWave']}")
    counts = [f"{label} {status[k]}" for k, label in COUNTS.items()
              if status.get(k) is not None]
    if counts:
        lines.append(f"  devices: {', '.join(counts)}")
    ops = [k for k in ("paused", "aborted") if spec.get(k)]
    if spec.get("retry"):
        ops.append(f"retry {spec['retry']}")
    if isinstance(spec.get("rollbackTo"), dict):
        ops.append(f"rollbackTo version {spec['rollbackTo'].get('version')}")
    if ops:
        lines.append(f"  spec: {', '.join(ops)}")
    waves = [w for w in status.get("waves") or [] if isinstance(w, dict)]
    if waves:
        lines.append("  waves:")
        rows = [[w.get("name"), w.get("devices"), w.get("updated", w.get("committed")),
                 w.get("failed"), w.get("stalled"),
                 (w.get("gate") or {}).get("verdict") if isinstance(w.get("gate"), dict)
                 else None] for w in waves]
        lines.append(_indent(table(rows, ["NAME", "DEVICES", "UPDATED", "FAILED", "STALLED",
                                          "GATE"])))
        for w in waves:
            gate = w.get("gate")
            if not isinstance(gate, dict):
                continue
            text = f"gate {w.get('name')}: {gate.get('verdict') or '-'}"
            if gate.get("message"):
                text += f": {gate['message']}"
            if gate.get("signals"):
                text += f" [{_signals(gate['signals'])}]"
            lines.append(f"    {text}")
    conds = [x for x in status.get("conditions") or [] if isinstance(x, dict)]
    if conds:
        lines.append("  conditions:")
        lines.append(_indent(table([[x.get("type"), x.get("status"), x.get("reason"),
                                     x.get("message")] for x in conds],
                                   ["TYPE", "STATUS", "REASON", "MESSAGE"])))
    if status.get("message"):
        lines.append(f"  message: {status['message']}")
    observed, generation = status.get("observedGeneration"), view.get("generation")
    if isinstance(observed, int) and isinstance(generation, int) and observed < generation:
        lines.append(f"  (status is for generation {observed}; the spec is at generation "
                     f"{generation}: the controller has not caught up yet)")
    return "\n".join(lines)
