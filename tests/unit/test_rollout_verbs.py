"""The rollout verbs as pure spec changes (controller/reconcile/verbs.py) and the text of
``edgefleet rollout status`` (controller/cli_rollout.py format_status / watch_outcome)."""

from __future__ import annotations

import copy
import json
import shlex
from typing import Any

import pytest

from controller.cli_rollout import format_status, watch_outcome
from controller.reconcile.verbs import VERBS, apply_verb, kubectl_patch_command
from protos.errors import Rejected


def rollout(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None,
            *, name: str = "digits", ns: str = "vision") -> dict[str, Any]:
    full = {"model": "digits", "waves": [{"name": "all", "percent": 100}], "paused": False,
            "aborted": False, "retry": 0, **(spec or {})}
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeRollout",
            "metadata": {"name": name, "namespace": ns, "generation": 3},
            "spec": full, "status": status or {}}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what `kubectl patch --type merge` does to the object)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


@pytest.mark.parametrize(("verb", "spec", "want", "reason"), [
    ("pause", {}, {"paused": True}, "RolloutPaused"),
    ("resume", {"paused": True, "aborted": True}, {"paused": False, "aborted": False},
     "RolloutResumed"),
    ("resume", {"paused": True}, {"paused": False}, "RolloutResumed"),
    ("abort", {}, {"aborted": True}, "RolloutAborted"),
    ("retry", {"retry": 2}, {"retry": 3}, "RolloutRetried"),
])
def test_verb_changes_only_its_fields(verb: str, spec: dict[str, Any], want: dict[str, Any],
                                      reason: str) -> None:
    res = rollout(spec)
    before = copy.deepcopy(res)
    r = apply_verb(res, verb)
    assert res == before, "the input is not modified"
    assert r.changed and r.reason == reason and r.key == "vision/digits"
    assert r.patch == {"spec": want}
    assert r.spec == {**res["spec"], **want}
    # kubectl patch --type merge with the same patch gives the same spec
    assert merge_patch(res, r.patch)["spec"] == r.spec
    assert r.message.startswith("EdgeRollout vision/digits ")
    for k, v in want.items():
        assert f"spec.{k}: {json.dumps(res['spec'].get(k, False))} -> {json.dumps(v)}" \
            in r.message


@pytest.mark.parametrize(("verb", "spec", "text"), [
    ("pause", {"paused": True}, "is already paused"),
    ("resume", {}, "is neither paused nor aborted"),
    ("abort", {"aborted": True}, "is already aborted"),
    ("undo", {"rollbackTo": {"version": 2}}, "already rolls back to version 2"),
])
def test_verb_that_changes_nothing_says_so(verb: str, spec: dict[str, Any], text: str) -> None:
    res = rollout(spec, {"previousVersion": 2})
    r = apply_verb(res, verb)
    assert not r.changed and r.patch == {} and r.spec == res["spec"]
    assert text in r.message and "nothing changed" in r.message


def test_fields_missing_from_a_hand_written_spec_read_as_defaults() -> None:
    res = {"metadata": {"name": "r"}, "spec": {"model": "m"}}
    assert not apply_verb(res, "resume").changed
    r = apply_verb(res, "pause")
    assert r.changed and r.namespace == "default" and r.spec == {"model": "m", "paused": True}
    assert apply_verb(res, "retry").spec["retry"] == 1


def test_retry_counts_from_what_the_controller_observed() -> None:
    # a re-applied YAML reset spec.retry to 0 after the controller had seen retry 4:
    # the next retry must be above status.observedRetry or it would do nothing
    r = apply_verb(rollout({"retry": 0}, {"observedRetry": 4}), "retry")
    assert r.spec["retry"] == 5 and "spec.retry: 0 -> 5" in r.message
    assert apply_verb(rollout({"retry": 7}, {"observedRetry": 4}), "retry").spec["retry"] == 8


def test_undo_defaults_to_the_previous_version() -> None:
    res = rollout({"version": 3}, {"version": 3, "previousVersion": 2})
    r = apply_verb(res, "undo")
    assert r.changed and r.reason == "RolloutUndone"
    assert r.patch == {"spec": {"rollbackTo": {"version": 2}}}
    assert r.spec["rollbackTo"] == {"version": 2} and r.spec["version"] == 3
    assert "rolling back to version 2" in r.message
    assert merge_patch(res, r.patch)["spec"] == r.spec


def test_undo_of_an_undo_takes_the_previous_version_as_published() -> None:
    # v3 shipped, then undone to v2's engines: the controller says the previous one is 3;
    # rollbackTo 3 on a rollout of version 3 ships the current engines again
    res = rollout({"rollbackTo": {"version": 2}}, {"version": 3, "previousVersion": 3})
    r = apply_verb(res, "undo", model_version=3)
    assert r.changed and r.spec["rollbackTo"] == {"version": 3}


def test_undo_to_an_explicit_version_and_to_another_one() -> None:
    res = rollout({"rollbackTo": {"version": 2}}, {"previousVersion": 2})
    r = apply_verb(res, "undo", to_version=1, model_version=3)
    assert r.changed and r.spec["rollbackTo"] == {"version": 1}
    assert 'spec.rollbackTo: {"version": 2} -> {"version": 1}' in r.message


def test_undo_without_history_is_refused() -> None:
    with pytest.raises(Rejected, match="no earlier version to undo to") as e:
        apply_verb(rollout(status={"version": 1}), "undo")
    assert e.value.reason == "no_history" and "--to-version" in str(e.value)


@pytest.mark.parametrize(("spec", "model_version", "to"), [
    ({"version": 3}, None, 3), ({"version": 3}, 9, 4), ({}, 2, 2), ({}, 2, 5)])
def test_undo_to_a_version_that_is_not_earlier_is_refused(
        spec: dict[str, Any], model_version: int | None, to: int) -> None:
    with pytest.raises(Rejected, match="is not earlier than the version it ships") as e:
        apply_verb(rollout(spec), "undo", to_version=to, model_version=model_version)
    assert e.value.reason == "not_earlier"


def test_undo_when_the_current_version_is_unknown_takes_the_given_one() -> None:
    assert apply_verb(rollout(), "undo", to_version=7).spec["rollbackTo"] == {"version": 7}


@pytest.mark.parametrize("bad", [0, -1, True, "2", 1.5])
def test_bad_to_version_is_refused(bad: Any) -> None:
    with pytest.raises(Rejected, match="toVersion must be an integer >= 1"):
        apply_verb(rollout(), "undo", to_version=bad)


def test_to_version_belongs_to_undo_only_and_unknown_verbs_are_refused() -> None:
    with pytest.raises(Rejected, match="toVersion only applies to undo, not to pause"):
        apply_verb(rollout(), "pause", to_version=1)
    with pytest.raises(Rejected, match="unknown rollout action 'status'") as e:
        apply_verb(rollout(), "status")
    assert e.value.reason == "unknown_verb"
    assert all(v in str(e.value) for v in VERBS)


def test_kubectl_patch_command_is_the_same_merge_patch() -> None:
    r = apply_verb(rollout({"retry": 1}, name="it's"), "retry")
    argv = shlex.split(kubectl_patch_command(r))
    assert argv[:9] == ["kubectl", "patch", "edgerollout", "it's", "-n", "vision",
                        "--type", "merge", "-p"]
    assert json.loads(argv[9]) == {"spec": {"retry": 2}}


# -- edgefleet rollout status ----------------------------------------------------------------
FULL_STATUS: dict[str, Any] = {
    "observedGeneration": 4, "phase": "Progressing", "version": 3, "revision": 5,
    "currentWave": "canary", "targeted": 10, "updated": 2, "failed": 1, "stalled": 1,
    "superseded": 0, "pending": 6, "previousVersion": 2,
    "waves": [
        {"name": "canary", "devices": 2, "updated": 2, "failed": 0, "stalled": 0,
         "gate": {"verdict": "Failed", "message": "error rate 4.0% is over 1.0%",
                  "signals": {"errorRatePercent": 4.0, "requests": 250}}},
        {"name": "rest", "devices": 8, "updated": 0, "failed": 1, "stalled": 1},
    ],
    "conditions": [
        {"type": "Progressing", "status": "True", "reason": "WaveInProgress",
         "message": "wave canary"},
        {"type": "Degraded", "status": "False", "reason": "AsExpected"},
    ],
    "message": "wave canary: gate watching",
}


def view(status: dict[str, Any], *, generation: int = 4,
         spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"namespace": "vision", "name": "digits", "generation": generation,
            "spec": {"model": "digits", **(spec or {})}, "status": status}


def test_format_status_shows_every_part_of_the_status() -> None:
    text = format_status(view(FULL_STATUS, spec={"paused": True, "retry": 2,
                                                 "rollbackTo": {"version": 2}}))
    lines = text.splitlines()
    assert lines[0] == "EdgeRollout vision/digits: Progressing"
    assert lines[1] == "  model digits, version 3 (revision 5)"
    assert lines[2] == "  wave: canary"
    assert lines[3] == ("  devices: targeted 10, updated 2, failed 1, stalled 1, "
                        "superseded 0, pending 6")
    assert lines[4] == "  spec: paused, retry 2, rollbackTo version 2"
    assert lines[5] == "  waves:"
    assert lines[6].split() == ["NAME", "DEVICES", "UPDATED", "FAILED", "STALLED", "GATE"]
    assert lines[7].split() == ["canary", "2", "2", "0", "0", "Failed"]
    assert lines[8].split() == ["rest", "8", "0", "1", "1", "-"]
    assert lines[9] == ("    gate canary: Failed: error rate 4.0% is over 1.0% "
                        "[errorRatePercent=4.0, requests=250]")
    assert lines[10] == "  conditions:"
    assert lines[11].split() == ["TYPE", "STATUS", "REASON", "MESSAGE"]
    assert lines[12].split() == ["Progressing", "True", "WaveInProgress", "wave", "canary"]
    assert lines[13].split() == ["Degraded", "False", "AsExpected", "-"]
    assert lines[14] == "  message: wave canary: gate watching"
    assert len(lines) == 15


def test_format_status_small_and_empty_and_stale() -> None:
    assert format_status(view({})) == ("EdgeRollout vision/digits: no status yet (the "
                                       "controller has not reconciled it)")
    small = format_status(view({"phase": "Pending", "version": 1, "revision": 0,
                                "observedGeneration": 1, "inProgress": 2, "backedOut": 1},
                               generation=2))
    assert small.splitlines() == [
        "EdgeRollout vision/digits: Pending", "  model digits, version 1",
        "  devices: in progress 2, backed out 1",
        "  (status is for generation 1; the spec is at generation 2: the controller has not "
        "caught up yet)"]
    # the reconcile of today names wave counts "committed"; signals may be a list
    text = format_status(view({"phase": "Progressing", "waves": [
        {"name": "all", "devices": 3, "committed": 1, "failed": 0,
         "gate": {"verdict": "Pending", "signals": [{"name": "requests", "value": 5,
                                                     "want": 100}, "soak"]}}]}))
    assert "all    3         1         0        -         Pending" in text
    assert "gate all: Pending [requests=5 (want=100), soak]" in text


@pytest.mark.parametrize(("status", "generation", "want"), [
    ({"phase": "Complete", "observedGeneration": 2}, 2, 0),
    ({"phase": "Complete", "observedGeneration": 1}, 2, None),   # older spec: not yet
    ({"phase": "Complete"}, 2, 0),
    ({"phase": "Aborted", "observedGeneration": 2}, 2, 1),
    ({"phase": "Paused", "conditions": [{"type": "Degraded", "status": "True",
                                         "reason": "GateFailed"}]}, 1, 1),
    ({"phase": "Failed", "conditions": [{"type": "Degraded", "status": "True",
                                         "reason": "HealthGateFailed"}]}, 1, 1),
    ({"phase": "Progressing", "conditions": [{"type": "Degraded", "status": "True",
                                              "reason": "DevicesFailed"}]}, 1, None),
    ({"phase": "Progressing", "conditions": [{"type": "Degraded", "status": "False",
                                              "reason": "GateFailed"}]}, 1, None),
    ({}, 1, None),
])
def test_watch_outcome(status: dict[str, Any], generation: int, want: int | None) -> None:
    assert watch_outcome(view(status, generation=generation)) == want
