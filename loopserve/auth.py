"""Bearer-token auth with three roles.

Tokens live in a JSON file {token: role} (mode 0600) or the environment variable LOOPSERVE_TOKENS
("token:role,token:role"). Roles are ordered: admin may do what annotator may, which may do what a
client may. Which role a method needs is declared here, in one table.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loopserve.config import ADMIN_SERVICE, FEEDBACK_SERVICE, POLICY_SERVICE, REWARD_SERVICE
from loopserve.errors import PermissionDenied, Unauthenticated

logger = logging.getLogger(__name__)

ROLES = ("client", "annotator", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}
TOKENS_ENV = "LOOPSERVE_TOKENS"

# The role each service's methods need. Health and reflection are open (probes carry no token).
SERVICE_ROLE = {
    POLICY_SERVICE: "client",
    REWARD_SERVICE: "client",
    FEEDBACK_SERVICE: "annotator",
    ADMIN_SERVICE: "admin",
}
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


@dataclass(frozen=True)
class TokenTable:
    tokens: Mapping[str, str]  # token -> role

    def role_of(self, token: str) -> str | None:
        # Constant-time comparison: do not leak how much of a token matched.
        for known, role in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return role
        return None

    def token_for(self, role: str) -> str:
        for token, r in self.tokens.items():
            if r == role:
                return token
        raise KeyError(role)


def required_role(full_method: str) -> str | None:
    """'/pkg.Service/Method' -> the role it needs, or None when the method is open."""
    service = full_method.lstrip("/").split("/", 1)[0]
    if service in OPEN_SERVICES:
        return None
    return SERVICE_ROLE.get(service, "admin")  # unknown services default to the strictest role


def authorize(table: TokenTable, full_method: str, metadata: Mapping[str, str]) -> str | None:
    """Return the caller's role, or raise Unauthenticated / PermissionDenied."""
    need = required_role(full_method)
    if need is None:
        return None
    header = metadata.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
    role = table.role_of(token.strip())
    if role is None:
        raise Unauthenticated("unknown token")
    if _RANK[role] < _RANK[need]:
        raise PermissionDenied(f"this call needs the {need} role; the token has the {role} role")
    return role


def _validate(tokens: Mapping[str, str], where: str) -> dict[str, str]:
    out = {}
    for token, role in tokens.items():
        if role not in _RANK:
            raise ValueError(f"{where}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        if len(token) < 16:
            raise ValueError(f"{where}: a token is shorter than 16 characters")
        out[str(token)] = role
    return out


def load_tokens(path: Path, environ: Mapping[str, str] | None = None) -> TokenTable:
    env = os.environ if environ is None else environ
    tokens: dict[str, str] = {}
    if path.is_file():
        tokens.update(_validate(json.loads(path.read_text()), str(path)))
    raw = env.get(TOKENS_ENV, "")
    if raw:
        pairs = dict(p.rsplit(":", 1) for p in raw.split(",") if p.strip())
        tokens.update(_validate(pairs, TOKENS_ENV))
    return TokenTable(tokens)


def ensure_token_file(path: Path) -> TokenTable:
    """The embedded default: create a token file with one random token per role, readable by us only."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tokens = {secrets.token_urlsafe(32): role for role in ROLES}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(tokens, f, indent=2)
        logger.warning("wrote new tokens (client, annotator, admin) to %s (mode 0600)", path)
    return load_tokens(path)


def read_token(path: Path, role: str) -> str:
    """The token of `role` from a token file (what the CLI, demo and trainer use)."""
    return load_tokens(path, environ={}).token_for(role)
