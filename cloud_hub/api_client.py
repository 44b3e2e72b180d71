"""The operator CLI's client for the admin API (urllib; no extra dependency)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cloud_hub.errors import HubError

HUB_URL_ENV, HUB_TOKEN_ENV = "EDGEFED_HUB_URL", "EDGEFED_HUB_TOKEN"


class AdminClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 60.0) -> None:
        self.url = (url or os.environ.get(HUB_URL_ENV) or "http://127.0.0.1:8080").rstrip("/")
        self.token = token or os.environ.get(HUB_TOKEN_ENV, "")
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            raise HubError(f"{method} {path}: {exc.code} {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise HubError(
                f"cannot reach the hub at {self.url} ({exc}); is 'cloud-hub serve' running? Set --hub or {HUB_URL_ENV}"
            ) from None

    def add_artifact(self, directory: Path) -> Any:
        if not (directory / "manifest.json").is_file():
            raise HubError(f"{directory} is not an artifact directory (no manifest.json)")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(directory.iterdir()):
                if path.is_file():
                    tar.add(path, arcname=path.name)
        return self.request("POST", "/v1/artifacts", buffer.getvalue(), "application/x-tar")

    def deploy(self, model: str, version: str, target: str) -> Any:
        body = json.dumps({"model": model, "version": version, "target": target}).encode()
        return self.request("POST", "/v1/deployments", body)
