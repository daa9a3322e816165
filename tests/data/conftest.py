"""Local object stores for the data tests: one moto S3 server and one GCS emulator per pytest
process (each xdist worker starts its own, on its own free port), started on first use. Tests keep
apart by prefix: `store.unique_url("name")`. See tests/storage_servers.py."""

from __future__ import annotations

import pytest

from tests.storage_servers import StoreServer, gcs_server, s3_server


@pytest.fixture(scope="session")
def s3_store() -> StoreServer:
    with s3_server() as store:
        yield store


@pytest.fixture(scope="session")
def gcs_store() -> StoreServer:
    with gcs_server() as store:
        yield store


@pytest.fixture(params=["s3", "gs"])
def object_store(request) -> StoreServer:
    """Each store in turn (a test taking it runs once per store)."""
    return request.getfixturevalue({"s3": "s3_store", "gs": "gcs_store"}[request.param])
