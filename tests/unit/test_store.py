"""Content-addressed store: sha256 naming, dedup, size limits, Artifact rows, no partial files."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from sqlmodel import Session, select

from controller.fleet.db import make_engine
from controller.fleet.models import Artifact
from controller.store import ArtifactStore
from protos.errors import Rejected


def test_put_bytes_and_file_are_content_addressed(tmp_path: Path) -> None:
    db = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store = ArtifactStore(tmp_path / "store", engine=db)
    data = b"engine bytes" * 1000
    a = store.put_bytes(data, kind="engine", meta={"x": 1})
    assert a.sha256 == hashlib.sha256(data).hexdigest()
    assert store.has(a.sha256) and store.path(a.sha256).read_bytes() == data
    src = tmp_path / "m.onnx"
    src.write_bytes(data)
    b = store.put_file(src, kind="model")
    assert b.sha256 == a.sha256 and b.size == len(data)
    with store.open(a.sha256) as f:
        assert f.read() == data
    with Session(db) as s:
        rows = s.exec(select(Artifact)).all()
    assert [(r.sha256, r.size, r.kind) for r in rows] == [(a.sha256, len(data), "engine")]
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_size_limit_rejects_and_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store", max_artifact_bytes=100)
    with pytest.raises(Rejected, match="limit"):
        store.put_bytes(b"x" * 101, kind="model")
    with pytest.raises(Rejected, match="limit"):
        store.put_stream(io.BytesIO(b"y" * 1000), kind="model")
    src = tmp_path / "big"
    src.write_bytes(b"z" * 50)
    with pytest.raises(Rejected, match="limit"):
        store.put_file(src, kind="model", max_bytes=10)
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert not any(p.is_file() for p in (tmp_path / "store" / "sha256").rglob("*"))


def test_bad_and_unknown_sha256(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(Rejected):
        store.path("../../etc/passwd")
    assert not store.has("A" * 64) and not store.has("0" * 64)
    with pytest.raises(Rejected, match="not in the store"):
        store.open("0" * 64)
