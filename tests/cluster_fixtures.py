"""Cluster fixtures, loaded by the test modules that use them (`pytest_plugins = ["cluster_fixtures"]`).

`cluster` is one 3-master loopback cluster for the whole session (about 2 s to start: a new master waits 2 s before
it declares itself writable), shared by every test that only reads and writes keys; tests that kill nodes start
their own with `start_cluster`. Both skip, with the server's reason, when the binary under test
(FASTWORKER_SERVER_BIN) cannot run a cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fastworker.localcluster import ClusterUnsupported, LocalCluster


def started_cluster(**kwargs: Any) -> LocalCluster:
    """A started LocalCluster(**kwargs), or a skip of the calling test when the binary cannot run one."""
    local = LocalCluster(**kwargs)
    try:
        return local.start()
    except ClusterUnsupported as exc:
        pytest.skip(f"the server binary cannot run a cluster: {exc}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """Three masters, no replicas, slots split evenly in node order. Do not kill its nodes."""
    local = started_cluster(masters=3)
    yield local
    local.stop()


@pytest.fixture
def start_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """A function starting a LocalCluster(**kwargs) of the test's own (for tests that kill nodes), stopped after
    the test; it skips the test when the binary cannot run a cluster."""
    started: list[LocalCluster] = []

    def start(**kwargs: Any) -> LocalCluster:
        started.append(started_cluster(**kwargs))
        return started[-1]

    yield start
    for local in started:
        local.stop()
