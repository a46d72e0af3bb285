"""The agent's trust state on disk: the pinned root key and the newest accepted KeyList.

:class:`TrustStore` loads the persisted root-signed key list at startup (re-verifying it
against the pinned root), adopts newer lists from the retained ``edgefleet/v1/trust/keys``
topic, and writes each adopted list atomically. Used by :mod:`agent.app` (key topic) and
:mod:`agent.update.verify` (through :attr:`TrustStore.state`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from protos import envelope
from protos.errors import Rejected
from protos.fsutil import write_atomic
from protos.trust import TrustState

log = logging.getLogger(__name__)


class TrustStore:
    """Pinned root + persisted key list (``path`` holds the signed KeyList envelope)."""

    def __init__(self, root_public: bytes, *, path: Path, max_envelope_bytes: int) -> None:
        self.path = path
        self.max_envelope_bytes = max_envelope_bytes
        self.state = TrustState(root_public=root_public)
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            # expiry is not checked here: a list that expired while the agent was off stays
            # in force until a newer one arrives (keys inside carry their own expiry)
            env = envelope.parse_envelope(data, max_bytes=self.max_envelope_bytes)
            self.state.accept_key_list(env, at_ms=0)
        except Rejected as e:
            log.error("persisted key list %s rejected (%s); waiting for a new one", self.path, e)
            return
        log.info("trust: key list v%d loaded (%d keys, %d revoked)",
                 self.state.key_list.version, len(self.state.key_list.keys),
                 len(self.state.key_list.revoked_key_ids))

    @property
    def version(self) -> int:
        return int(self.state.key_list.version)

    def accept(self, data: bytes) -> bool:
        """Verify untrusted key-list bytes; adopt and persist when newer. Raises Rejected."""
        env = envelope.parse_envelope(data, max_bytes=self.max_envelope_bytes)
        with self._lock:
            adopted = self.state.accept_key_list(env)
            if adopted:
                write_atomic(self.path, data, mode=0o600)
                kl = self.state.key_list
                log.info("trust: adopted key list v%d (%d keys, revoked %s)", kl.version,
                         len(kl.keys), list(kl.revoked_key_ids))
        return adopted
