"""The operator CLI's client for the admin API (urllib; no extra dependency)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from cloud_hub.errors import Conflict, HubError, NotFound


class _Counting(io.RawIOBase):
    """A readable body streamed from a file that reports how much of it was read (progress bars)."""

    def __init__(self, source: BinaryIO, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.source, self.total, self.progress, self.offset = source, total, progress, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(1 << 20 if size < 0 else max(size, 65536))
        self.offset += len(chunk)
        if self.progress is not None:
            self.progress(self.offset, self.total)
        return chunk


HUB_URL_ENV, HUB_TOKEN_ENV = "EDGEFED_HUB_URL", "EDGEFED_HUB_TOKEN"


class AdminClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 60.0) -> None:
        self.url = (url or os.environ.get(HUB_URL_ENV) or "http://127.0.0.1:8080").rstrip("/")
        self.token = token or os.environ.get(HUB_TOKEN_ENV, "")
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                length: int | None = None, raw: bool = False) -> Any:  # fmt: skip
        """The reply's JSON (its bytes with ``raw``); NotFound, Conflict or HubError naming the cause."""
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        if length is not None:
            req.add_header("Content-Length", str(length))
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                data = response.read()
                return data if raw else json.loads(data)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            kind = {404: NotFound, 409: Conflict}.get(exc.code, HubError)
            raise kind(f"{method} {path}: {exc.code} {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise HubError(
                f"cannot reach the hub at {self.url} ({exc}); is 'cloud-hub serve' running? Set --hub or {HUB_URL_ENV}"
            ) from None

    def add_artifact(self, directory: Path, progress: Callable[[int, int], None] | None = None,
                     allow_interface_change: bool = False) -> Any:  # fmt: skip
        """Upload an artifact directory as a tar; ``progress(bytes_sent, total)`` as it goes."""
        if not (directory / "manifest.json").is_file():
            raise HubError(f"{directory} is not an artifact directory (no manifest.json)")
        with tempfile.TemporaryFile() as spooled:  # streamed from disk: never the whole tar in memory
            with tarfile.open(fileobj=spooled, mode="w") as tar:
                for path in sorted(directory.iterdir()):
                    if path.is_file():
                        tar.add(path, arcname=path.name)
            total = spooled.tell()
            spooled.seek(0)
            route = "/v1/artifacts?allow_interface_change=1" if allow_interface_change else "/v1/artifacts"
            return self.request("POST", route, _Counting(spooled, total, progress), "application/x-tar", total)

    def deploy(self, model: str, version: str, target: str) -> Any:
        body = json.dumps({"model": model, "version": version, "target": target}).encode()
        return self.request("POST", "/v1/deployments", body)
