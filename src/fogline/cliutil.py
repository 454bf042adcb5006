"""Parsing and hub-client helpers shared by CLI commands."""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fogline.errors import AuthError, ConfigError, FoglineError, NotFoundError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration_s(text: str) -> float:
    """'90', '30s', '15m', '1h', '2d', '250ms' -> seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ConfigError(f"invalid duration {text!r}: use e.g. 30s, 15m, 1h, 2d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def parse_host_port(text: str, option: str) -> tuple[str, int]:
    """`HOST:PORT` (port 0-65535); ConfigError naming the option otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{option} must be HOST:PORT, e.g. 127.0.0.1:1883; got {text!r}")
    return host, int(port)


def parse_labels(text: str | None) -> dict[str, str]:
    """'k=v,k2=v2' -> {'k': 'v', 'k2': 'v2'}."""
    if not text:
        return {}
    labels: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid label {item!r}: expected key=value")
        labels[key.strip()] = value.strip()
    return labels


_POLICY_FIELDS = {"priority": int, "bandwidth_bps": float, "quota_bytes": int,
                  "overflow": str, "burst_bytes": int}


def parse_stream_policy(text: str) -> tuple[str, dict[str, Any]]:
    """'alerts:priority=10,bandwidth_bps=50000,overflow=drop-oldest' -> (name, fields),
    checked by building the StreamPolicy it describes."""
    from fogline.core.outbox import StreamPolicy, check_stream_name

    name, _, rest = text.partition(":")
    try:
        check_stream_name(name.strip())
    except FoglineError as exc:
        raise ConfigError(f"--stream {text!r}: {exc}") from exc
    fields: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        kind = _POLICY_FIELDS.get(key.strip())
        if not sep or kind is None:
            raise ConfigError(f"--stream {text!r}: expected key=value with keys "
                              f"{', '.join(_POLICY_FIELDS)}")
        try:
            fields[key.strip()] = kind(float(value)) if kind is int else kind(value.strip())
        except ValueError as exc:
            raise ConfigError(f"--stream {text!r}: {key} must be a number") from exc
    StreamPolicy(**fields)  # refuses bad values with a clear ConfigError
    return name.strip(), fields


def _actor() -> str:
    """Who runs this command, for the hub's audit log."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class HubClient:
    """The hub's HTTP API as the CLI uses it."""

    url: str
    token: str
    verify: ssl.SSLContext | bool = True

    @classmethod
    def resolve(cls, hub: str | None, token: str | None, data: Path | None) -> HubClient:
        """Hub URL and admin token from flags, then FOGLINE_HUB/FOGLINE_TOKEN, then the
        data dir of a local hub."""
        hub = hub or os.environ.get("FOGLINE_HUB")
        token = token or os.environ.get("FOGLINE_TOKEN")
        verify: ssl.SSLContext | bool = True
        data = data or (Path(os.environ["FOGLINE_DATA"]) if "FOGLINE_DATA" in os.environ
                        else None)
        if data is not None:
            if hub is None and (data / "hub.url").exists():
                hub = (data / "hub.url").read_text().strip()
            if token is None and (data / "admin.token").exists():
                token = (data / "admin.token").read_text().strip()
            if (data / "pki" / "ca.crt").exists():
                verify = ssl.create_default_context(cafile=str(data / "pki" / "ca.crt"))
        if not hub or not token:
            raise ConfigError("no hub: pass --hub and --token, set FOGLINE_HUB and "
                              "FOGLINE_TOKEN, or pass --data DIR of a local hub")
        return cls(hub.rstrip("/"), token, verify)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx  # not at module level: `fogline node` never needs it

        try:
            response = httpx.request(method, f"{self.url}{path}", json=body,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "X-Fogline-Actor": _actor()},
                                     verify=self.verify, timeout=60)
        except httpx.HTTPError as exc:
            raise ConfigError(f"cannot reach the hub at {self.url}: {exc}") from exc
        if response.status_code == 401:
            raise AuthError(f"hub refused: {response.json().get('detail')}")
        if response.status_code == 404:
            raise NotFoundError(response.json().get("detail", "not found"))
        if response.status_code >= 400:
            raise ConfigError(f"hub error {response.status_code}: {response.text[:500]}")
        return response.json()
