"""MQTT topic names, built in one place. Used by the controller, the agent and tests.

Everything lives under ``edgefleet/v1/``; each device owns the subtree
``edgefleet/v1/devices/{device_id}/`` so a broker ACL can confine it there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "edgefleet/v1"
DEVICE_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
# a model name, optionally ".variant": what a device keys its slots and offers by
MODEL_KEY_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,125}[a-z0-9])?$")

# leaf names under a device subtree, and who publishes them
HEARTBEAT = "heartbeat"          # device -> controller, protobuf Heartbeat
METRICS = "metrics"              # device -> controller, protobuf Metrics
PRESENCE = "presence"            # device -> controller, Presence; retained; last will = offline
UPDATE_STATUS = "update/status"  # device -> controller, UpdateStatus
CHUNK_REQUEST = "update/request" # device -> controller, ChunkRequest
OFFER = "update/offer"           # controller -> device, SignedEnvelope(UpdateManifest); retained
# one retained offer per (model, variant): update/offer/{model_key} (model_key = name or
# name.variant), so several models on one device each keep their own pending update
OFFERS = "update/offer/#"        # the agent's subscription over its per-model offer topics
CHUNK = "update/chunk"           # controller -> device, UpdateChunk
DESIRED = "desired"              # controller -> device, SignedEnvelope(DesiredState); retained

DEVICE_TO_CONTROLLER = (HEARTBEAT, METRICS, PRESENCE, UPDATE_STATUS, CHUNK_REQUEST)
CONTROLLER_TO_DEVICE = (OFFER, OFFERS, CHUNK, DESIRED)

TRUST_KEYS = f"{PREFIX}/trust/keys"  # controller -> all, SignedEnvelope(KeyList) by root; retained


def valid_device_id(device_id: str) -> bool:
    """True when ``device_id`` is safe to use in a topic and a file name."""
    return bool(DEVICE_ID_RE.match(device_id))


def device_topic(device_id: str, leaf: str) -> str:
    """Topic ``edgefleet/v1/devices/{device_id}/{leaf}``; rejects unsafe ids."""
    if not valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}: use [a-z0-9._-], 1-63 chars")
    return f"{PREFIX}/devices/{device_id}/{leaf}"


def offer_leaf(model_key: str) -> str:
    """Leaf of the retained offer topic of one (model, variant) key of a device."""
    if not MODEL_KEY_RE.match(model_key):
        raise ValueError(f"invalid model key {model_key!r}")
    return f"{OFFER}/{model_key}"


def offer_key(leaf: str) -> str | None:
    """The model key of a per-model offer leaf (``update/offer/{key}``); None otherwise."""
    head = OFFER + "/"
    if not leaf.startswith(head):
        return None
    key = leaf[len(head):]
    return key if MODEL_KEY_RE.match(key) else None


def device_subscription(leaf: str, *, shared_group: str | None = None) -> str:
    """Wildcard subscription for one leaf across all devices (optionally an MQTT 5 shared one)."""
    topic = f"{PREFIX}/devices/+/{leaf}"
    return f"$share/{shared_group}/{topic}" if shared_group else topic


@dataclass(frozen=True)
class ParsedTopic:
    device_id: str
    leaf: str


def parse_device_topic(topic: str) -> ParsedTopic | None:
    """Split a device topic into (device_id, leaf); None when it is not one of ours."""
    head = f"{PREFIX}/devices/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head):]
    device_id, sep, leaf = rest.partition("/")
    if not sep or not valid_device_id(device_id) or not leaf:
        return None
    return ParsedTopic(device_id, leaf)


# -- remote builders (docs/builder.md): one subtree per builder, like devices ----------------
BUILDER_ANNOUNCE = "announce"  # builder -> controller, SignedEnvelope(BuilderAnnounce); retained; will
BUILDER_JOB = "job"            # controller -> builder, SignedEnvelope(BuildJob) by an online key
BUILDER_RESULT = "result"      # builder -> controller, SignedEnvelope(BuildResult) by the builder


def builder_topic(builder_id: str, leaf: str) -> str:
    """Topic ``edgefleet/v1/builders/{builder_id}/{leaf}``; rejects unsafe ids."""
    if not valid_device_id(builder_id):
        raise ValueError(f"invalid builder id {builder_id!r}: use [a-z0-9._-], 1-63 chars")
    return f"{PREFIX}/builders/{builder_id}/{leaf}"


def builder_subscription(leaf: str) -> str:
    """Wildcard subscription for one leaf across all builders."""
    return f"{PREFIX}/builders/+/{leaf}"


def parse_builder_topic(topic: str) -> ParsedTopic | None:
    """Split a builder topic into (builder_id, leaf); None when it is not one."""
    head = f"{PREFIX}/builders/"
    if not topic.startswith(head):
        return None
    builder_id, sep, leaf = topic[len(head):].partition("/")
    if not sep or not valid_device_id(builder_id) or not leaf:
        return None
    return ParsedTopic(builder_id, leaf)
