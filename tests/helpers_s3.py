"""A real S3 endpoint for tests: moto in server mode on 127.0.0.1 and a free port.

    with moto_s3("bucket") as s3:     # s3.endpoint, s3.client (boto3), s3.bucket
        TrajectoryStore("s3://bucket/prefix")   # finds the endpoint via AWS_ENDPOINT_URL

While the server runs, the AWS variables point every client in this process (boto3, s3fs
through storage.trajectory.s3_options_from_env) at it with dummy credentials, and no proxy is
used for 127.0.0.1; they are restored afterwards. Nothing is sent anywhere but 127.0.0.1.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
           "ALL_PROXY", "all_proxy", "KNOW_S3_ENDPOINT_URL")


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    client: Any  # boto3 S3 client on the endpoint

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under prefix (listed with boto3, not with the code under test)."""
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def versions(self, prefix: str = "") -> dict[str, int]:
        """Number of stored versions per key under prefix (needs versioning=True)."""
        counts: dict[str, int] = {}
        for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=prefix):
            for v in page.get("Versions", []):
                counts[v["Key"]] = counts.get(v["Key"], 0) + 1
        return counts


@contextmanager
def aws_env(endpoint: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, *CLEARED, "AWS_ENDPOINT_URL", "NO_PROXY", "no_proxy")}
    try:
        for k in CLEARED:
            os.environ.pop(k, None)
        os.environ.update(AWS_ENV)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        for k in ("NO_PROXY", "no_proxy"):
            os.environ[k] = ",".join(filter(None, [os.environ.get(k), "127.0.0.1", "localhost"]))
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def moto_s3(bucket: str = "know-test", versioning: bool = False) -> Iterator[S3Server]:
    """Start moto's S3 on 127.0.0.1:<free port>, create `bucket`, point the AWS env at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with aws_env(endpoint):
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=bucket)
            if versioning:
                client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
            yield S3Server(endpoint, bucket, client)
    finally:
        _forget_s3fs_instances()
        server.stop()


def _forget_s3fs_instances() -> None:
    """fsspec caches filesystem instances by their options: close their HTTP sessions (else
    aiohttp complains about unclosed sessions at exit) and drop them. Zarr opens s3fs in async
    mode on its own event loop, so the sessions are closed on that loop."""
    try:
        import s3fs
        from zarr.core.sync import sync as zarr_sync
    except ImportError:
        return
    for fs in list(s3fs.S3FileSystem._cache.values()):
        creator = getattr(fs, "_s3creator", None)
        if creator is None:
            continue
        try:
            if fs.loop is not None and fs.loop.is_running():
                from fsspec.asyn import sync

                sync(fs.loop, creator.__aexit__, None, None, None, timeout=10)
            else:
                zarr_sync(creator.__aexit__(None, None, None), timeout=10)
        except Exception:  # noqa: BLE001 - best effort: only a warning at exit is at stake
            pass
        fs._s3creator = fs._s3 = None
    s3fs.S3FileSystem.clear_instance_cache()
