"""The hub as operator of its NATS deployment: keys, account JWTs, node credentials.

Keys are created once in `DIR/nats/keys.json` (mode 0600) and never leave the hub.
The fleet account JWT is re-issued (with a fresh `jti` and the current revocation
list) whenever revocations change and at every hub start, and pushed to the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fogline.fsutil import write_private
from fogline.transport import natsjwt
from fogline.transport.natsjwt import NKey

FLEET_ACCOUNT = "FLEET"
SYSTEM_ACCOUNT = "SYS"
_KEY_NAMES = ("operator", "system_account", "fleet_account", "node_signing", "hub_user",
              "system_user")



@dataclass(frozen=True)
class NatsAuthority:
    operator: NKey
    system_account: NKey
    fleet_account: NKey
    node_signing: NKey
    hub_user: NKey
    system_user: NKey

    @classmethod
    def open(cls, directory: Path) -> NatsAuthority:
        """Load the keys from `directory`, creating them on first use."""
        path = directory / "keys.json"
        if path.exists():
            seeds = json.loads(path.read_text())
            return cls(**{name: NKey(seeds[name]) for name in _KEY_NAMES})
        authority = cls(
            operator=natsjwt.create_operator_key(),
            system_account=natsjwt.create_account_key(),
            fleet_account=natsjwt.create_account_key(),
            node_signing=natsjwt.create_account_key(),
            hub_user=natsjwt.create_user_key(),
            system_user=natsjwt.create_user_key(),
        )
        seeds = {name: getattr(authority, name).seed for name in _KEY_NAMES}
        write_private(path, json.dumps(seeds, indent=2))
        return authority

    def operator_jwt(self, now_s: int) -> str:
        return natsjwt.operator_jwt(self.operator, self.system_account.public_key, now_s)

    def system_account_jwt(self, now_s: int) -> str:
        return natsjwt.account_jwt(self.operator, self.system_account, SYSTEM_ACCOUNT, now_s,
                                   jetstream=False)

    def fleet_account_jwt(self, now_s: int, revocations: dict[str, int]) -> str:
        return natsjwt.account_jwt(
            self.operator, self.fleet_account, FLEET_ACCOUNT, now_s, jetstream=True,
            node_signing_key=self.node_signing.public_key, revocations=revocations,
        )

    def hub_creds(self, now_s: int) -> str:
        jwt = natsjwt.unrestricted_user_jwt(self.fleet_account, self.hub_user.public_key,
                                            "hub", now_s)
        return natsjwt.creds_file(jwt, self.hub_user)

    def system_creds(self, now_s: int) -> str:
        jwt = natsjwt.unrestricted_user_jwt(self.system_account, self.system_user.public_key,
                                            "hub-system", now_s)
        return natsjwt.creds_file(jwt, self.system_user)

    def node_jwt(self, node_id: str, user_public_key: str, now_s: int, expires_s: int) -> str:
        return natsjwt.scoped_user_jwt(self.node_signing, self.fleet_account.public_key,
                                       user_public_key, node_id, now_s, expires_s)

    def server_config(self, *, host: str, port: int, store_dir: Path, now_s: int,
                      revocations: dict[str, int], tls_cert: Path | None = None,
                      tls_key: Path | None = None, tls_ca: Path | None = None,
                      server_name: str = "fogline-hub") -> str:
        """nats-server configuration for operator mode with a persistent full resolver.

        With TLS files given, clients must present a certificate from the hub's CA
        (mutual TLS) in addition to their JWT, and only TLS 1.3 is accepted.
        """
        resolver_dir = store_dir / "resolver"
        lines = [
            f'server_name: "{server_name}"',
            f'host: "{host}"',
            f"port: {port}",
            "max_payload: 8MB",
            # fsync every write: a batch the hub acknowledged (and the node then deleted)
            # must survive a power loss of the hub machine, not only a process crash.
            f'jetstream {{ store_dir: "{store_dir / "jetstream"}", sync_interval: always }}',
            f'operator: "{self.operator_jwt(now_s)}"',
            f'system_account: "{self.system_account.public_key}"',
            f'resolver: {{ type: full, dir: "{resolver_dir}", allow_delete: false }}',
            "resolver_preload: {",
            f'  {self.system_account.public_key}: "{self.system_account_jwt(now_s)}"',
            f'  {self.fleet_account.public_key}: "{self.fleet_account_jwt(now_s, revocations)}"',
            "}",
        ]
        if tls_cert is not None and tls_key is not None and tls_ca is not None:
            lines.append(
                f'tls {{ cert_file: "{tls_cert}", key_file: "{tls_key}", '
                f'ca_file: "{tls_ca}", verify: true, min_version: "1.3" }}'
            )
        return "\n".join(lines) + "\n"
