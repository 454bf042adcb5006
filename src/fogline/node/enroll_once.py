"""First-start enrollment for `fogline node`, done before the lean agent starts."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

import msgspec

from fogline.errors import AuthError, RetryableError
from fogline.node import identity as ident
from fogline.node.capabilities import discover

log = logging.getLogger("fogline.node")
RETRY_DELAY_MAX_S = 30.0


def default_name() -> str:
    return socket.gethostname().split(".")[0].lower()


def enroll_if_needed(config: dict[str, Any]) -> None:
    """Enroll with the hub unless the data dir already holds an identity; retries while
    the hub is unreachable, fails at once on a refused token."""
    files = ident.NodeFiles(Path(config["data_dir"]))
    if files.enrolled():
        return
    if not config.get("hub_url") or not config.get("token"):
        raise AuthError(f"{files.dir} holds no identity: pass --hub and --token")
    options = ident.EnrollOptions(
        hub_url=config["hub_url"].rstrip("/"), token=config["token"],
        name=config.get("name") or default_name(), region=config.get("region", ""),
        zone=config.get("zone", ""), tier=config.get("tier", "near"),
        labels=config.get("labels", {}), ca_sha256=config.get("ca_sha256"))
    capabilities = msgspec.to_builtins(discover())
    delay_s = 1.0
    while True:
        try:
            identity = ident.enroll(files, options, capabilities, time.time())
        except RetryableError as exc:
            log.warning("enrollment: %s; retrying in %.0fs", exc, delay_s)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_DELAY_MAX_S)
            continue
        log.info("enrolled as %s (%s)", identity.node_id, identity.name)
        return
