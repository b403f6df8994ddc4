"""API keys of the service: a JSON file of names, roles and SHA-256 hashes (never the keys), checked in constant time.

``gaussad keys add NAME --role score|admin --keys FILE`` prints a new random key once; the service (``gaussad serve
--keys FILE``) answers 401 to a request without a valid ``Authorization: Bearer KEY`` and 403 to a key whose role
may not do what is asked. ``admin`` may do everything ``score`` may.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DataError, GaussadError
from ..intake.files import write_atomic

log = logging.getLogger(__name__)

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
        self._seen = _signature(path) if path is not None else None  # the file as last read: reread when it changes
        self._broken = False

    @classmethod
    def load(cls, path: str | os.PathLike, missing_ok: bool = False) -> "KeyStore":
        path = Path(path)
        if not path.exists():
            if missing_ok:
                return cls([], path)
            raise DataError(f"{path}: no such keys file (create one with `gaussad keys add NAME --keys {path}`)")
        return cls(cls._read(path), path)

    @staticmethod
    def _read(path: Path) -> list[KeyEntry]:
        """The entries of a keys file; a file others may write (as ssh refuses) or cannot parse is a DataError."""
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise DataError(f"{path}: cannot read the keys file: {exc.strerror or exc}") from None
        if os.name == "posix" and mode & 0o022:
            raise DataError(f"{path}: the keys file is writable by {'others' if mode & 0o002 else 'its group'}, so "
                            f"anyone who can write it can give themselves a key: chmod 600 {path}")
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
        return entries

    def refresh(self) -> None:
        """Reread the file when it changed (another inode, size or modification time) since it was read: a key
        added or removed with `gaussad keys` takes effect at the next request. A file that cannot be read then
        refuses every key (one log line) until it can: a revocation never falls back to the old keys."""
        if self.path is None:
            return
        seen = _signature(self.path)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            self.entries, self._broken = self._read(self.path), False
        except DataError as exc:
            if not self._broken:
                log.error("%s; every key is refused until the file is fixed", exc)
            self.entries, self._broken = [], True

    def save(self) -> None:
        """Write the keys atomically, mode 600. A symbolic link is written through: its target (the file a service
        reads) is replaced, and the link stays."""
        if self.path is None:
            raise GaussadError("this key store has no file")
        doc = {"format": FORMAT, "keys": [asdict(e) for e in self.entries]}
        target = Path(os.path.realpath(self.path))
        write_atomic(target, (json.dumps(doc, indent=2) + "\n").encode("utf-8"), "keys file")
        try:
            os.chmod(target, 0o600)
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
        self.refresh()
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


def _signature(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def is_loopback(host: str, resolve: bool = True) -> bool:
    """Whether ``host`` (an address or a name) reaches only this machine: an address in 127.0.0.0/8 or ::1, or a
    name every address of which is one (``127.attacker.example`` is a name like any other, resolved and checked).
    Without ``resolve`` only ``localhost`` and loopback addresses as written count (for names an attacker may point
    at 127.0.0.1: DNS rebinding)."""
    name = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    if not resolve:
        return name.lower() == "localhost"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
