"""A local S3 server for tests and benchmarks: moto's server in its own process on
127.0.0.1 and a free port, stopped (and its objects gone) when the `with` ends.

    with local_s3() as s3:
        s3.make_bucket("runs")
        cfg["store"] = "s3://runs/a/acts.zarr"; cfg["store_options"] = s3.options

Credentials are fake ones moto accepts; they go in the environment (and to any
subprocess), as a real run's would. `S3Unavailable` says why a server could not
start, so a test can skip with that reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Unavailable(RuntimeError):
    pass


@dataclass
class LocalS3:
    endpoint: str

    @property
    def options(self) -> dict:
        """The config's `store_options` for a store on this server."""
        return {"endpoint_url": self.endpoint}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, use_listings_cache=False)

    def make_bucket(self, name: str):
        self.fs().mkdir(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3(timeout: float = 60.0):
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        raise S3Unavailable(f"moto[server] or s3fs is not installed ({e}); `make setup` installs them") from None
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    # The server logs every request: to a file, since a pipe nobody reads would fill and stall it.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise S3Unavailable(f"the local S3 server exited at start: {log.read().decode()[-300:]}")
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise S3Unavailable(f"the local S3 server did not answer on {endpoint} within {timeout:.0f} s")
                time.sleep(0.2)
        yield LocalS3(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
