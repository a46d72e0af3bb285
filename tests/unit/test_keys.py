"""Keys: init/rotate/revoke produce root-signed key lists that an agent's TrustState accepts."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from controller.ota.keys import KeyStore
from protos import envelope, trust
from protos.edgefleet.v1 import update_pb2
from protos.errors import GiveUp, Rejected


def _manifest() -> update_pb2.UpdateManifest:
    return update_pb2.UpdateManifest(update_id="u1", model_name="m", version=1)


def test_init_rotate_revoke_against_trust_state(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    ks = KeyStore.init(d)
    for p in [d / "root.key", d / "state.json", *(d / "signing").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    with pytest.raises(Rejected, match="already exist"):
        KeyStore.init(d)
    state = trust.TrustState(root_public=ks.root_public_raw())
    assert state.accept_key_list(ks.key_list_envelope())
    old_env = ks.sign(_manifest())
    assert state.verify(old_env, update_pb2.UpdateManifest).update_id == "u1"

    old_id = ks.state.current
    new_id = KeyStore(d).rotate()
    ks = KeyStore(d)
    assert ks.state.current == new_id != old_id
    assert state.accept_key_list(ks.key_list_envelope())
    state.verify(old_env, update_pb2.UpdateManifest)          # old key still listed
    state.verify(ks.sign(_manifest()), update_pb2.UpdateManifest)

    ks.revoke(old_id)
    assert state.accept_key_list(KeyStore(d).key_list_envelope())
    with pytest.raises(Rejected) as e:
        state.verify(old_env, update_pb2.UpdateManifest)
    assert e.value.reason == "revoked_key"


def test_revoking_current_key_rotates_and_old_lists_are_refused(tmp_path: Path) -> None:
    ks = KeyStore.init(tmp_path / "k")
    state = trust.TrustState(root_public=ks.root_public_raw())
    first = ks.key_list_envelope()
    state.accept_key_list(first)
    cur = ks.state.current
    new = ks.revoke(cur)
    assert new and new != cur and ks.state.current == new
    state.accept_key_list(ks.key_list_envelope())
    with pytest.raises(Rejected):
        state.accept_key_list(first)   # replaying the old list would un-revoke
    assert envelope.key_id(ks.signing_key().public_key()) == new
    with pytest.raises(Rejected):
        ks.revoke("nope")


def test_root_offline_blocks_changes(tmp_path: Path) -> None:
    ks = KeyStore.init(tmp_path / "k")
    (tmp_path / "k" / "root.key").rename(tmp_path / "root.key.offline")
    ks.sign(_manifest())                      # signing still works with the online key
    with pytest.raises(GiveUp, match="offline"):
        ks.rotate()
