"""Content-addressed artifact store (source models, engines, deltas, samples) by sha256."""

from controller.store.blobs import ArtifactStore, StoredArtifact
from protos.fsutil import sha256_file

__all__ = ["ArtifactStore", "StoredArtifact", "sha256_file"]
