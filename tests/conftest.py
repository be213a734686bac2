"""Shared pytest fixtures."""

import contextlib
import gc
import os
from collections.abc import Iterator

import pytest

S3_BUCKET = "mmshim-test"  # created by the s3_server fixture


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on 127.0.0.1 holding the bucket "mmshim-test".

    Uses the server `.ci/run` started (MMSHIM_TEST_S3_ENDPOINT) if there is one, else starts
    moto's ThreadedMotoServer in this process. Dummy AWS credentials and region are set in the
    environment for the rest of the session (subprocesses inherit them), so no test can reach
    real AWS with a developer's own credentials.
    """
    import boto3

    mp = pytest.MonkeyPatch()
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        mp.delenv(var, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = None
    endpoint = os.environ.get("MMSHIM_TEST_S3_ENDPOINT")
    if not endpoint:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=S3_BUCKET)
        client.close()
        yield endpoint
    finally:
        if server is not None:
            server.stop()
        mp.undo()


def open_fds() -> set[str]:
    """This process's open files: sockets left out, as an S3 client's pool may open another
    connection at any request, and those of garbage (an earlier test's) closed first."""
    gc.collect()
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                fds.add(fd)
    return fds
