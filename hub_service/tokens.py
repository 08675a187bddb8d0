"""Agent tokens: high-entropy secrets shown once; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from .models import TokenRow, utcnow
from .roles import Role
from .state import IssuedToken
from .validation import Limits, validate_agent_id


def new_token() -> str:
    return "kh_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 is enough here: tokens carry 256 random bits, so there is nothing to brute-force."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue(
    agent_id: str, ttl: timedelta | None, role: Role = Role.AGENT
) -> tuple[TokenRow, IssuedToken]:
    """A new token for `agent_id` (INVALID_ARGUMENT for an id Hello would refuse): the row a
    store keeps, with the hash only, and what is shown once."""
    validate_agent_id(agent_id, Limits())
    token = new_token()
    row = TokenRow(
        token_id="tok_" + secrets.token_hex(6),
        agent_id=agent_id,
        token_hash=hash_token(token),
        role=role.value,
        expires_at=utcnow() + ttl if ttl else None,
    )
    return row, IssuedToken(row.token_id, agent_id, token, row.expires_at, role, row.created_at)
