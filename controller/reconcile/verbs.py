"""Operator verbs on an EdgeRollout (pause, resume, abort, retry, undo) as pure spec changes.

``apply_verb(resource, verb, to_version=..., model_version=...)`` takes the stored rollout
(a Kubernetes-shaped dict: metadata, spec, status) and returns a ``VerbResult``: the new
spec, the JSON merge patch that makes the same change (``kubectl patch --type merge``), the
Event reason and a message naming the rollout and the values. Nothing is written here:
controller/api/rollouts.py stores the spec through the apply path (validation, generation
bump, reconcile kick) and writes the Event; in cluster mode it hands the user
``kubectl_patch_command(...)``. Each verb is a change of the SPEC only, so ``kubectl patch``
does the same thing and the controller reacts to it level-triggered:

- pause:  ``spec.paused = true``
- resume: ``spec.paused = false`` and ``spec.aborted = false`` (``spec.rollbackTo`` stays)
- abort:  ``spec.aborted = true``
- retry:  ``spec.retry = max(spec.retry, status.observedRetry) + 1`` (a re-applied YAML
  resets spec.retry to 0; counting from what the controller already saw keeps retry working)
- undo:   ``spec.rollbackTo = {version: N}``, N = ``to_version`` (refused unless earlier than
  the version the rollout ships) or ``status.previousVersion`` (taken as the controller
  wrote it)

Invalid input raises ``protos.errors.Rejected`` (the API answers 422 with its message).
"""

from __future__ import annotations

import copy
import json
import shlex
from dataclasses import dataclass
from typing import Any

from protos.errors import Rejected

VERBS = ("pause", "resume", "abort", "retry", "undo")
EVENT_REASONS = {"pause": "RolloutPaused", "resume": "RolloutResumed",
                 "abort": "RolloutAborted", "retry": "RolloutRetried", "undo": "RolloutUndone"}


@dataclass(frozen=True)
class VerbResult:
    """What one verb does to one rollout."""

    verb: str
    namespace: str
    name: str
    spec: dict[str, Any]        # the whole new spec (equal to the old one when not changed)
    patch: dict[str, Any]       # JSON merge patch of the object: {"spec": {...changed keys}}
    changed: bool
    reason: str                 # Event reason, e.g. RolloutPaused
    message: str                # Event message / the line the CLI shows

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _int(value: Any) -> int | None:
    """An int field of a stored object (None when absent or not an integer)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


def _identity(resource: dict[str, Any]) -> tuple[str, str]:
    md = _mapping(resource.get("metadata"))
    return str(md.get("namespace") or "default"), str(md.get("name") or "")


def check_to_version(value: Any) -> int | None:
    """``toVersion`` from a request body: None, or an integer >= 1 (Rejected otherwise)."""
    if value is None:
        return None
    if _int(value) is None or value < 1:
        raise Rejected(f"toVersion must be an integer >= 1, not {value!r}", reason="bad_body")
    return int(value)


def _undo_version(key: str, spec: dict[str, Any], status: dict[str, Any], *,
                  to_version: int | None, model_version: int | None) -> int:
    if to_version is None:
        # the controller's word: the model version whose engines shipped before the current
        # ones (after an undo that is the current version itself: undo toggles back)
        previous = _int(status.get("previousVersion"))
        if previous is None or previous < 1:
            raise Rejected(f"EdgeRollout {key} has no earlier version to undo to "
                           "(status.previousVersion is not set: the controller publishes it "
                           "once this rollout has shipped a version before the current one); "
                           "name one with --to-version N", reason="no_history")
        return previous
    current = _int(spec.get("version")) or model_version
    rollback = _int(_mapping(spec.get("rollbackTo")).get("version"))
    if current is not None and to_version >= current and to_version != rollback:
        raise Rejected(f"EdgeRollout {key}: version {to_version} is not earlier than the "
                       f"version it ships ({current}); undo rolls back to an earlier one (to "
                       "ship the current version again, remove spec.rollbackTo)",
                       reason="not_earlier")
    return to_version


def apply_verb(resource: dict[str, Any], verb: str, *, to_version: int | None = None,
               model_version: int | None = None) -> VerbResult:
    """The spec change of ``verb`` on ``resource`` (see the module docstring).

    ``to_version`` is undo's target (only undo takes it); ``model_version`` is the
    EdgeModel's spec.version, the version a rollout without spec.version ships (used to
    refuse an undo ``to_version`` that is not earlier). Raises Rejected for an unknown verb,
    a to_version on another verb, or an undo with no version to go back to.
    """
    if verb not in VERBS:
        raise Rejected(f"unknown rollout action {verb!r}: use one of {', '.join(VERBS)} "
                       "(status is read with GET /api/v1/rollouts/{namespace}/{name})",
                       reason="unknown_verb")
    if to_version is not None and verb != "undo":
        raise Rejected(f"toVersion only applies to undo, not to {verb}", reason="bad_body")
    to_version = check_to_version(to_version)
    ns, name = _identity(resource)
    key = f"{ns}/{name}"
    old = _mapping(resource.get("spec"))
    status = _mapping(resource.get("status"))
    changes: dict[str, Any] = {}
    if verb == "pause":
        changes = {"paused": True}
        done, already = "paused", "is already paused"
    elif verb == "resume":
        changes = {"paused": False, "aborted": False}
        done, already = "resumed", "is neither paused nor aborted"
    elif verb == "abort":
        changes = {"aborted": True}
        done, already = ("aborted: no new offers; its updated devices return to their "
                         "previous engine"), "is already aborted"
    elif verb == "retry":
        base = max(_int(old.get("retry")) or 0, _int(status.get("observedRetry")) or 0)
        changes = {"retry": base + 1}
        done, already = "retried: failed and stalled devices are offered again", ""
    else:
        version = _undo_version(key, old, status, to_version=to_version,
                                model_version=model_version)
        changes = {"rollbackTo": {"version": version}}
        done = f"undone: rolling back to version {version}"
        already = f"already rolls back to version {version} (spec.rollbackTo.version)"
    # a field left out of the stored spec reads as the CRD default
    defaults: dict[str, Any] = {"paused": False, "aborted": False, "retry": 0,
                                "rollbackTo": None}
    diff = {k: v for k, v in changes.items() if old.get(k, defaults[k]) != v}
    spec = copy.deepcopy(old)
    spec.update(copy.deepcopy(diff))
    reason = EVENT_REASONS[verb]
    if not diff:
        return VerbResult(verb, ns, name, spec, {}, False, reason,
                          f"EdgeRollout {key} {already}; nothing changed")
    values = ", ".join(f"spec.{k}: {_show(old.get(k, defaults[k]))} -> {_show(v)}"
                       for k, v in diff.items())
    return VerbResult(verb, ns, name, spec, {"spec": diff}, True, reason,
                      f"EdgeRollout {key} {done} ({values})")


def kubectl_patch_command(result: VerbResult) -> str:
    """The ``kubectl patch`` command line that makes the same change as ``result``."""
    body = json.dumps(result.patch, separators=(",", ":"), sort_keys=True)
    return (f"kubectl patch edgerollout {shlex.quote(result.name)} -n "
            f"{shlex.quote(result.namespace)} --type merge -p {shlex.quote(body)}")
