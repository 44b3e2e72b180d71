"""The operator CLI's client for the admin API (urllib; no extra dependency)."""

from __future__ import annotations

import http.client
import io
import json
import os
import ssl
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from cloud_hub.errors import Conflict, HubError, NotFound
from edge_agent.errors import ConfigError
from edge_agent.tls import client_context, verify_failure


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


def _copy(source: BinaryIO, sink: BinaryIO) -> int:
    copied = 0
    while block := source.read(1 << 20):
        sink.write(block)
        copied += len(block)
    return copied


HUB_URL_ENV, HUB_TOKEN_ENV = "EDGEFED_HUB_URL", "EDGEFED_HUB_TOKEN"
HUB_CA_ENV = "EDGEFED_HUB_CA"  # the PEM CA an https:// hub's certificate is verified with


class AdminClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 60.0,
                 ca: str | Path | None = None) -> None:  # fmt: skip
        """``ca``: the PEM CA of an https:// hub's certificate (default: EDGEFED_HUB_CA, else the system's CAs)."""
        self.url = (url or os.environ.get(HUB_URL_ENV) or "http://127.0.0.1:8080").rstrip("/")
        self.token = token or os.environ.get(HUB_TOKEN_ENV, "")
        self.timeout_s = timeout_s
        self.ca = ca or os.environ.get(HUB_CA_ENV) or None
        self._context: ssl.SSLContext | None = None

    @property
    def context(self) -> ssl.SSLContext | None:
        """The TLS context of an https:// hub (made on first use: a bad CA file is a HubError naming it)."""
        if self.ca and self.url.startswith("http://"):  # a CA says TLS is meant: never send the token in clear
            raise HubError(f"{HUB_CA_ENV} (a CA for the hub's certificate) is set but the hub URL {self.url} is "
                           "plain http://; use https:// (the hub runs with --admin-tls) or unset it")  # fmt: skip
        if self._context is None and self.url.startswith("https://"):
            try:
                self._context = client_context(self.ca, ca_flag=HUB_CA_ENV)
            except ConfigError as exc:
                raise HubError(str(exc)) from None
        return self._context

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                length: int | None = None, raw: bool = False, sink: BinaryIO | None = None) -> Any:  # fmt: skip
        """The reply's JSON (its bytes with ``raw``; with ``sink``, the body is streamed there and its byte
        count returned); NotFound, Conflict or HubError naming the cause."""
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        if length is not None:
            req.add_header("Content-Length", str(length))
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self.context) as response:
                if sink is not None:
                    return _copy(response, sink)
                data = response.read()
                return data if raw else json.loads(data)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            kind = {404: NotFound, 409: Conflict}.get(exc.code, HubError)
            raise kind(f"{method} {path}: {exc.code} {message}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            self._tls_failure(exc)
            raise HubError(
                f"cannot reach the hub at {self.url} ({exc}); is 'cloud-hub serve' running? Set --hub or {HUB_URL_ENV}"
            ) from None

    def _tls_failure(self, exc: BaseException) -> None:
        """A HubError naming the fix when ``exc`` is a TLS problem: an untrusted certificate, or http/https mixed."""
        reason = verify_failure(exc)
        if reason is not None:
            raise HubError(f"the hub at {self.url} is not trusted: its TLS certificate does not verify ({reason}); "
                           f"set {HUB_CA_ENV} to the CA that signed it (ca.pem of tls init)") from None  # fmt: skip
        cause = getattr(exc, "reason", exc)
        if self.url.startswith("https://") and isinstance(cause, ssl.SSLError):
            raise HubError(f"no TLS at {self.url} ({cause}); is the hub serving plain http? Use http://, or "
                           "start it with --admin-tls") from None  # fmt: skip
        if self.url.startswith("http://") and isinstance(exc, ConnectionResetError | http.client.HTTPException):
            raise HubError(f"the hub at {self.url} closed the connection ({exc}); if it serves https (serve "
                           "--admin-tls), use https:// and set " + HUB_CA_ENV) from None  # fmt: skip

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
