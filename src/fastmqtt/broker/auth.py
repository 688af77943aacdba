"""Authentication: Mosquitto-compatible password files and the plug-in chain.

Password file format (the one ``mosquitto_passwd`` writes), one user a line::

    user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512(password, salt)>
    user:$6$<base64 salt>$<base64 SHA512(password || salt)>

``$7$`` is Mosquitto 2's default (``-H sha512-pbkdf2``); ``$6$`` is what
Mosquitto 1.6 and earlier wrote (``-H sha512``). Empty lines and lines
starting with ``#`` are ignored; a line we cannot parse is logged and skipped
(it never matches), as Mosquitto does.

Hashing is deliberately slow, so it never runs on the trio loop: checks go to
a worker thread (``trio.to_thread.run_sync``) under a small capacity limiter
so a login storm cannot take every core. Successful checks are remembered in
a small cache keyed by a digest of (user, password) and tied to the exact hash
line they were verified against: a reload that changes the user's line makes
the cache entry useless without having to flush it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import trio

__all__ = [
    "PasswordEntry",
    "parse_password_line",
    "load_password_file",
    "hash_password",
    "verify_password",
    "PasswordFileAuthenticator",
    "ChainAuthenticator",
    "DEFAULT_ITERATIONS",
]

log = logging.getLogger("fastmqtt.broker.auth")

#: PBKDF2 iterations for new ``$7$`` hashes. Mosquitto 2.0 writes 101; we pick
#: more (a check costs ~1 ms), the count is stored in the line so either tool
#: verifies the other's hashes.
DEFAULT_ITERATIONS = 1000
SALT_BYTES = 12  # what mosquitto_passwd uses

BAD_USER_NAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87


@dataclass(frozen=True)
class PasswordEntry:
    """One parsed password line.

    Attributes:
        username: the user.
        scheme: ``"7"`` (PBKDF2-SHA512) or ``"6"`` (salted SHA-512).
        iterations: PBKDF2 rounds (``$7$`` only; 0 for ``$6$``).
        salt: raw salt bytes.
        digest: raw hash bytes.
        line: the hash part of the line as written (cache key).
    """

    username: str
    scheme: str
    iterations: int
    salt: bytes
    digest: bytes
    line: str


def _b64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def parse_password_line(line: str) -> PasswordEntry | None:
    """Parse one ``user:hash`` line.

    Args:
        line: the line, with or without its newline.

    Returns:
        The entry, or None for a blank line or a comment.

    Raises:
        ValueError: when the line is neither blank, a comment, nor a valid
            ``$6$``/``$7$`` entry.
    """
    line = line.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    username, sep, hashed = line.partition(":")
    if not sep or not username:
        raise ValueError("expected user:hash")
    hashed = hashed.strip()
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            iterations = int(parts[2])
            if iterations < 1:
                raise ValueError("iterations must be >= 1")
            return PasswordEntry(username, "7", iterations, _b64(parts[3]), _b64(parts[4]), hashed)
        if len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            return PasswordEntry(username, "6", 0, _b64(parts[2]), _b64(parts[3]), hashed)
    except (ValueError, UnicodeEncodeError) as exc:  # binascii.Error is a ValueError
        raise ValueError(f"bad hash for user {username!r}: {exc}") from None
    raise ValueError(f"unsupported hash for user {username!r} (need $6$ or $7$)")


def load_password_file(path: str | os.PathLike) -> dict[str, PasswordEntry]:
    """Read a password file.

    Args:
        path: the file.

    Returns:
        username -> entry; bad lines are logged and left out; when a user
        appears twice the last line wins.

    Raises:
        OSError: when the file cannot be read.
    """
    entries: dict[str, PasswordEntry] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                entry = parse_password_line(line)
            except ValueError as exc:
                log.warning("%s:%d: %s; line ignored", path, lineno, exc)
                continue
            if entry is not None:
                entries[entry.username] = entry
    return entries


def _compute(entry_scheme: str, password: bytes, salt: bytes, iterations: int, dklen: int) -> bytes:
    if entry_scheme == "7":
        return hashlib.pbkdf2_hmac("sha512", password, salt, iterations, dklen)
    return hashlib.sha512(password + salt).digest()


def hash_password(password: str | bytes, *, scheme: str = "7",
                  iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """Hash a password the way ``mosquitto_passwd`` does.

    Args:
        password: the password (str is UTF-8 encoded).
        scheme: ``"7"`` for PBKDF2-HMAC-SHA512, ``"6"`` for salted SHA-512.
        iterations: PBKDF2 rounds (``"7"`` only).
        salt: fixed salt for tests; random 12 bytes by default.

    Returns:
        The hash field, e.g. ``$7$1000$<salt>$<hash>`` (no user name).

    Raises:
        ValueError: for an unknown scheme or iterations < 1.
    """
    if isinstance(password, str):
        password = password.encode("utf-8")
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    enc = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    if scheme == "7":
        if iterations < 1:
            raise ValueError("iterations must be >= 1")
        return f"$7${iterations}${enc(salt)}${enc(_compute('7', password, salt, iterations, 64))}"
    if scheme == "6":
        return f"$6${enc(salt)}${enc(_compute('6', password, salt, 0, 64))}"
    raise ValueError(f"unknown scheme {scheme!r}")


def verify_password(entry: PasswordEntry, password: bytes | str) -> bool:
    """Check a password against an entry (blocking: run it in a thread).

    Args:
        entry: from :func:`parse_password_line`.
        password: what the client sent.

    Returns:
        True when it matches; the comparison is constant-time.
    """
    if isinstance(password, str):
        password = password.encode("utf-8")
    computed = _compute(entry.scheme, password, entry.salt, entry.iterations, len(entry.digest) or 64)
    return hmac.compare_digest(computed, entry.digest)


_DUMMY_ENTRY = PasswordEntry("", "7", DEFAULT_ITERATIONS, b"\0" * SALT_BYTES, b"\0" * 64, "")


class PasswordFileAuthenticator:
    """Authenticator backed by a Mosquitto-compatible password file.

    Accepts a CONNECT whose user name is in the file and whose password
    matches; everything else gets 0x86 (bad user name or password). Anonymous
    clients are not this class's business (see :class:`ChainAuthenticator`):
    it answers 0x87 for them.

    Args:
        path: the password file.
        cache_size: successful checks remembered (0 disables the cache).
        max_threads: hashing threads at once.

    Raises:
        OSError: when the file cannot be read at start-up.
    """

    def __init__(self, path: str | os.PathLike, *, cache_size: int = 1024, max_threads: int = 2) -> None:
        self.path = os.fspath(path)
        self.entries = load_password_file(self.path)
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._cache_size = cache_size
        self._limiter = trio.CapacityLimiter(max_threads)

    def reload(self) -> bool:
        """Re-read the file (on SIGHUP). If it cannot be read the old entries stay.

        Returns:
            True when the file was re-read.
        """
        try:
            entries = load_password_file(self.path)
        except OSError as exc:
            log.error("password file %s not reloaded: %s", self.path, exc)
            return False
        self.entries = entries
        log.info("password file %s reloaded: %d users", self.path, len(entries))
        return True

    def _cache_key(self, username: str, password: bytes) -> bytes:
        # A keyed digest, so the cache never holds the password itself.
        return hashlib.blake2b(password, key=username.encode("utf-8")[:64], digest_size=32,
                               person=b"fastmqtt-auth").digest() + username.encode("utf-8")

    async def authenticate(self, client_id: str, username: str | None,
                           password: bytes | None, connect: Any) -> int:
        """Check a CONNECT's credentials.

        Args:
            client_id: unused.
            username: user name from CONNECT; None for anonymous.
            password: password from CONNECT.
            connect: the CONNECT packet (unused).

        Returns:
            0 when accepted, 0x86 when the user is unknown or the password
            wrong, 0x87 for an anonymous client.
        """
        if username is None:
            return NOT_AUTHORIZED
        entry = self.entries.get(username)
        if password is None:
            return BAD_USER_NAME_OR_PASSWORD
        if entry is None:
            # Spend the same time as for a real user, so response timing does
            # not tell which user names exist.
            await trio.to_thread.run_sync(verify_password, _DUMMY_ENTRY, password,
                                          limiter=self._limiter)
            return BAD_USER_NAME_OR_PASSWORD
        key = self._cache_key(username, password) if self._cache_size else b""
        if key and self._cache.get(key) == entry.line:
            self._cache.move_to_end(key)
            return 0
        ok = await trio.to_thread.run_sync(verify_password, entry, password, limiter=self._limiter)
        if not ok:
            return BAD_USER_NAME_OR_PASSWORD
        if key:
            self._cache[key] = entry.line
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return 0


class ChainAuthenticator:
    """Applies the anonymous policy, then asks each authenticator in turn.

    * No user name: accepted when ``allow_anonymous``; otherwise the
      ``plugins`` (not the password file, which knows only named users) may
      still accept it — a token carried in the password alone is legal in
      MQTT 5 — and the answer is 0x87 Not authorized when none does.
    * A user name: the first authenticator answering 0 accepts; otherwise the
      last non-zero answer is returned (0x86 when there is nothing to ask).

    Args:
        authenticators: checked in order (password file first, then plug-ins).
        allow_anonymous: accept clients that send no user name.
        anonymous_capable: the subset of ``authenticators`` asked about
            anonymous clients.
    """

    def __init__(self, authenticators: Iterable[Any], allow_anonymous: bool,
                 anonymous_capable: Iterable[Any] = ()) -> None:
        self.authenticators = list(authenticators)
        self.allow_anonymous = allow_anonymous
        self.anonymous_capable = list(anonymous_capable)

    def reload(self) -> None:
        """Reload every member that can (password file on SIGHUP)."""
        for auth in self.authenticators:
            reload = getattr(auth, "reload", None)
            if reload is not None:
                reload()

    async def authenticate(self, client_id: str, username: str | None,
                           password: bytes | None, connect: Any) -> int:
        """See :class:`~fastmqtt.broker.interfaces.Authenticator`."""
        if username is None:
            if self.allow_anonymous:
                return 0
            for auth in self.anonymous_capable:
                if await auth.authenticate(client_id, username, password, connect) == 0:
                    return 0
            return NOT_AUTHORIZED
        result = BAD_USER_NAME_OR_PASSWORD
        for auth in self.authenticators:
            rc = await auth.authenticate(client_id, username, password, connect)
            if rc == 0:
                return 0
            result = rc
        return result
