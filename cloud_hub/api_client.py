"""The operator CLI's client for the admin API (urllib; no extra dependency)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_hub.errors import Conflict, HubError, NotFound


class _Counting(io.RawIOBase):
    """A readable body that reports how much of it was read (for upload progress bars)."""

    def __init__(self, data: bytes, progress: Callable[[int, int], None]) -> None:
        self.data, self.progress, self.offset = data, progress, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else min(len(self.data), self.offset + max(size, 65536))
        chunk, self.offset = self.data[self.offset : end], end
        self.progress(self.offset, len(self.data))
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
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(directory.iterdir()):
                if path.is_file():
                    tar.add(path, arcname=path.name)
        body = buffer.getvalue()
        route = "/v1/artifacts?allow_interface_change=1" if allow_interface_change else "/v1/artifacts"
        return self.request("POST", route, _Counting(body, progress) if progress else body,
                            "application/x-tar", len(body))  # fmt: skip

    def deploy(self, model: str, version: str, target: str) -> Any:
        body = json.dumps({"model": model, "version": version, "target": target}).encode()
        return self.request("POST", "/v1/deployments", body)
