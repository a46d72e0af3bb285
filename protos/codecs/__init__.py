"""OTA delta codecs: ``make`` (controller), ``apply`` (agent), ``plan`` (controller).

The byte formats are part of the wire contract (docs/deltas.md). ``apply`` is pure byte
operations (zstandard, bsdiff4, numpy): no ``onnx`` import anywhere in this package. Every delta
file carries a header with its codec name, the target size and sha256 and the base sha256, so
it can be checked before a byte is written; output is written atomically and only after its
sha256 matched. Called by controller.ota.planner (plan/make), agent.update (apply) and the
``edgefleet delta`` CLI (:mod:`protos.codecs.cli`).

Names are loaded lazily so that the bsdiff4 block workers (``protos.codecs.blockworker``)
do not import numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protos.codecs.container import Header
    from protos.codecs.core import CODECS, apply, make, read_delta_header, verify
    from protos.codecs.planner import DeltaChoice, plan

__all__ = ["CODECS", "DeltaChoice", "Header", "apply", "make", "plan", "read_delta_header",
           "verify"]

_WHERE = {"Header": "container", "CODECS": "core", "apply": "core", "make": "core",
          "read_delta_header": "core", "verify": "core", "DeltaChoice": "planner",
          "plan": "planner"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"protos.codecs.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'protos.codecs' has no attribute {name!r}")
