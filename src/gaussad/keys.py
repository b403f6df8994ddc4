"""API keys of the service: a JSON file of names, roles and SHA-256 hashes (never the keys), checked in constant time.

``gaussad keys add NAME --role score|admin --keys FILE`` prints a new random key once; the service (``gaussad serve
--keys FILE``) answers 401 to a request without a valid ``Authorization: Bearer KEY`` and 403 to a key whose role
may not do what is asked. ``admin`` may do everything ``score`` may.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DataError, GaussadError
from .files import write_atomic

ROLES = ("score", "admin")
KEY_BYTES = 32  # 256 random bits, URL-safe base64 (43 characters)
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
FORMAT = "gaussad-keys/1"


@dataclass(frozen=True)
class KeyEntry:
    name: str
    role: str
    sha256: str
    created: float

    def allows(self, role: str) -> bool:
        """Whether this key may act in ``role`` (admin includes score)."""
        return ROLES.index(self.role) >= ROLES.index(role)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise GaussadError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


class KeyStore:
    """The keys of one file. ``check(key)`` compares the key's hash with every stored hash in constant time."""

    def __init__(self, entries: list[KeyEntry] | None = None, path: Path | None = None):
        self.entries = list(entries or [])
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, missing_ok: bool = False) -> "KeyStore":
        path = Path(path)
        if not path.exists():
            if missing_ok:
                return cls([], path)
            raise DataError(f"{path}: no such keys file (create one with `gaussad keys add NAME --keys {path}`)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("keys"), list):
                raise ValueError(f"not a gaussad keys file (expected format {FORMAT!r})")
            entries = []
            for item in doc["keys"]:
                entry = KeyEntry(str(item["name"]), _check_role(item["role"]), str(item["sha256"]), float(item["created"]))
                if not re.fullmatch(r"[0-9a-f]{64}", entry.sha256):
                    raise ValueError(f"key {entry.name!r}: sha256 is not 64 hex digits")
                entries.append(entry)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, GaussadError) as exc:
            raise DataError(f"{path}: cannot read the keys file: {exc}") from None
        return cls(entries, path)

    def save(self) -> None:
        if self.path is None:
            raise GaussadError("this key store has no file")
        doc = {"format": FORMAT, "keys": [asdict(e) for e in self.entries]}
        write_atomic(self.path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"), "keys file")
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass

    def add(self, name: str, role: str) -> str:
        """Add a key named ``name`` with ``role``; returns the key (only its hash is kept)."""
        if not _NAME.match(name):
            raise GaussadError(f"key name must be 1-64 letters, digits or _.@-, got {name!r}")
        _check_role(role)
        if any(e.name == name for e in self.entries):
            raise GaussadError(f"{self.path}: a key named {name!r} exists already (remove it first)")
        key = secrets.token_urlsafe(KEY_BYTES)
        self.entries.append(KeyEntry(name, role, key_hash(key), time.time()))
        return key

    def remove(self, name: str) -> None:
        kept = [e for e in self.entries if e.name != name]
        if len(kept) == len(self.entries):
            raise GaussadError(f"{self.path}: no key named {name!r}")
        self.entries = kept

    def check(self, key: str | None) -> KeyEntry | None:
        """The entry of ``key``, or None. Every stored hash is compared (``hmac.compare_digest``), so the time taken
        does not depend on which entry, or how much of a hash, matches."""
        if not key:
            return None
        digest = key_hash(key).encode("ascii")
        found = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.sha256.encode("ascii")):
                found = entry
        return found


def bearer(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header (None when absent or of another scheme)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")
