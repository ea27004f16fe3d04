"""Agent and analyst credentials: SCRAM-SHA-256 verifiers derived once per rules load.

A rules entry's ``password`` may be a plain password or a Postgres-style SCRAM verifier
(``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``); either way the proxy keeps only
the verifier. Unknown users get a decoy verifier so that a SCRAM exchange fails the same way and
takes the same time whether or not the name exists.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass

import scramp

from pgproxy.rules import Rules

MECHANISM = "SCRAM-SHA-256"
ITERATIONS = 4096
_MECH = scramp.ScramMechanism(MECHANISM)

AuthInfo = tuple[bytes, bytes, bytes, int]


def verifier_from_password(password: str, iterations: int = ITERATIONS) -> AuthInfo:
    salt, stored_key, server_key, count = _MECH.make_auth_info(password, iteration_count=iterations)
    return salt, stored_key, server_key, count


def parse_verifier(text: str) -> AuthInfo | None:
    """Decode a ``SCRAM-SHA-256$iter:salt$stored:server`` string; None if it is not one."""
    if not text.startswith(MECHANISM + "$"):
        return None
    try:
        _, iter_salt, keys = text.split("$")
        iterations, salt = iter_salt.split(":")
        stored, server = keys.split(":")
        return (
            base64.b64decode(salt, validate=True),
            base64.b64decode(stored, validate=True),
            base64.b64decode(server, validate=True),
            int(iterations),
        )
    except (ValueError, TypeError):
        return None


def format_verifier(info: AuthInfo) -> str:
    salt, stored, server, iterations = info
    salt_b64, stored_b64, server_b64 = (
        base64.b64encode(x).decode() for x in (salt, stored, server)
    )
    return f"{MECHANISM}${iterations}:{salt_b64}${stored_b64}:{server_b64}"


@dataclass(frozen=True)
class Identity:
    name: str
    kind: str  # "agent" or "analyst"
    auth: AuthInfo
    #: the plain secret when the rules gave one (needed only for cleartext auth over TLS)
    password: str | None


class CredentialStore:
    """Name → Identity, built from the rules once per load."""

    def __init__(self, rules: Rules) -> None:
        self._ids: dict[str, Identity] = {}
        for kind, entries in (("agent", rules.agents), ("analyst", rules.analysts)):
            for entry in entries:
                secret = entry.secret()
                info = parse_verifier(secret)
                if info is None:
                    self._ids[entry.name] = Identity(
                        entry.name, kind, verifier_from_password(secret), secret
                    )
                else:
                    self._ids[entry.name] = Identity(entry.name, kind, info, None)
        self._decoy = verifier_from_password(secrets.token_urlsafe(16))

    def get(self, name: str) -> Identity | None:
        return self._ids.get(name)

    def auth_info(self, name: str) -> AuthInfo:
        ident = self._ids.get(name)
        return ident.auth if ident is not None else self._decoy

    def check_password(self, name: str, password: str) -> bool:
        """Cleartext check (only offered over TLS): compare against the SCRAM verifier."""
        ident = self._ids.get(name)
        salt, stored, _server, iterations = ident.auth if ident else self._decoy
        _s, candidate, _k, _i = _MECH.make_auth_info(
            password, iteration_count=iterations, salt=salt
        )
        return ident is not None and hmac.compare_digest(candidate, stored)


class ScramServer:
    """One SCRAM-SHA-256 exchange from the server side."""

    def __init__(self, store: CredentialStore, user: str) -> None:
        info = store.auth_info(user)
        self._server = _MECH.make_server(lambda _username: info)

    def first(self, client_first: str) -> str:
        # libpq sends an empty SCRAM user name ("n=,": Postgres uses the startup user), which
        # scramp's parser rejects. Parse with a stand-in, then restore the exact bare message,
        # since the client's proof is computed over it.
        gs2_end = client_first.find(",", client_first.find(",") + 1) + 1
        bare = client_first[gs2_end:]
        if bare.startswith("n=,"):
            self._server.set_client_first(client_first[:gs2_end] + "n=*" + bare[2:])
            self._server.client_first_bare = bare
        else:
            self._server.set_client_first(client_first)
        return str(self._server.get_server_first())

    def final(self, client_final: str) -> str:
        """Raises scramp.ScramException when the proof is wrong."""
        self._server.set_client_final(client_final)
        return str(self._server.get_server_final())
