"""Fixtures shared by the Kubernetes integration tests (tests/integration/test_kube_*.py).

``kube``: the Kubernetes API emulator (tests/helpers/kube.py) with the edgefleet CRDs
installed; ``api``: a CustomObjectsApi on it. Imports are lazy so the other integration
tests do not pay for (or need) kmock and the kubernetes client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.helpers.kube import RunningKube


@pytest.fixture
def kube() -> Iterator[RunningKube]:
    pytest.importorskip("kubernetes")
    from tests.helpers.kube import RunningKube
    from tests.helpers.kube_testkit import install_crds

    k = RunningKube()
    try:
        api = k.api_client()
        install_crds(api)
        api.close()
        yield k
    finally:
        k.close()


@pytest.fixture
def api(kube: RunningKube) -> Iterator[Any]:
    from kubernetes import client

    c = kube.api_client()
    yield client.CustomObjectsApi(c)
    c.close()
