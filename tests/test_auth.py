"""Authenticators: password file, anonymous policy, plug-ins, reload, rate limiter."""

import base64
import hashlib
import hmac
import json
import threading
import time
import types

import pytest
import trio

from fastmqtt.broker import auth as auth_mod
from fastmqtt.broker.acl import AclAuthorizer, ChainAuthorizer
from fastmqtt.broker.auth import (
    ChainAuthenticator,
    PasswordFileAuthenticator,
    hash_password,
)
from fastmqtt.broker.interfaces import AllowAll
from fastmqtt.broker.security import RateLimiter, build_security, load_object
from fastmqtt.enums import ReasonCode


def write_pw(path, **users):
    path.write_text("".join(f"{u}:{hash_password(p)}\n" for u, p in users.items()))
    return str(path)


def cfg(**kw):
    base = dict(allow_anonymous=None, password_file=None, acl_file=None, auth_plugin=None,
                acl_plugin=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


# ------------------------------------------------------------ password file

async def test_password_file_accepts_and_refuses(tmp_path):
    a = PasswordFileAuthenticator(write_pw(tmp_path / "pw", alice="good", bob="other"))
    assert await a.authenticate("c1", "alice", b"good", None) == 0
    assert await a.authenticate("c1", "alice", b"bad", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert await a.authenticate("c1", "alice", None, None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert await a.authenticate("c1", "carol", b"good", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert await a.authenticate("c1", "bob", b"good", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert await a.authenticate("c1", None, None, None) == ReasonCode.NOT_AUTHORIZED


async def test_hashing_runs_off_the_loop(tmp_path, monkeypatch):
    """The PBKDF2 check runs in a worker thread, never on the trio thread."""
    a = PasswordFileAuthenticator(write_pw(tmp_path / "pw", alice="good"))
    threads = []
    real = auth_mod.verify_password

    def spy(entry, password):
        threads.append(threading.get_ident())
        return real(entry, password)

    monkeypatch.setattr(auth_mod, "verify_password", spy)
    assert await a.authenticate("c", "alice", b"good", None) == 0
    assert threads and threads[0] != threading.get_ident()


async def test_success_cache_and_reload(tmp_path, monkeypatch):
    path = tmp_path / "pw"
    a = PasswordFileAuthenticator(write_pw(path, alice="good"))
    calls = []
    real = auth_mod.verify_password
    monkeypatch.setattr(auth_mod, "verify_password", lambda e, p: calls.append(1) or real(e, p))
    assert await a.authenticate("c", "alice", b"good", None) == 0
    assert await a.authenticate("c", "alice", b"good", None) == 0
    assert len(calls) == 1  # second success served from the cache
    assert await a.authenticate("c", "alice", b"bad", None) != 0  # failures are never cached
    assert len(calls) == 2
    # Password changed in the file: the cached success must not survive reload.
    write_pw(path, alice="new")
    assert a.reload()
    assert await a.authenticate("c", "alice", b"good", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert await a.authenticate("c", "alice", b"new", None) == 0


async def test_reload_keeps_old_entries_when_file_vanishes(tmp_path):
    path = tmp_path / "pw"
    a = PasswordFileAuthenticator(write_pw(path, alice="good"))
    path.unlink()
    assert not a.reload()
    assert await a.authenticate("c", "alice", b"good", None) == 0


async def test_mosquitto_passwd_hashes_accepted(tmp_path):
    import subprocess

    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "m", "from-mosquitto"], check=True,
                   capture_output=True, timeout=30)
    a = PasswordFileAuthenticator(str(f))
    assert await a.authenticate("c", "m", b"from-mosquitto", None) == 0
    assert await a.authenticate("c", "m", b"x", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD


# ------------------------------------------------------------ build_security

async def test_nothing_configured_is_allow_all():
    authn, authz = build_security(cfg())
    assert isinstance(authn, AllowAll) and isinstance(authz, AllowAll)
    authn, authz = build_security(types.SimpleNamespace())  # attributes missing entirely
    assert isinstance(authn, AllowAll) and isinstance(authz, AllowAll)


async def test_password_file_turns_anonymous_off_by_default(tmp_path):
    authn, authz = build_security(cfg(password_file=write_pw(tmp_path / "pw", alice="a")))
    assert not isinstance(authn, AllowAll)
    assert isinstance(authz, AllowAll)
    assert await authn.authenticate("c", None, None, None) == ReasonCode.NOT_AUTHORIZED
    assert await authn.authenticate("c", "alice", b"a", None) == 0
    assert await authn.authenticate("c", "alice", b"b", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD


async def test_password_file_with_anonymous_allowed(tmp_path):
    authn, _ = build_security(cfg(password_file=write_pw(tmp_path / "pw", alice="a"),
                                  allow_anonymous=True))
    assert await authn.authenticate("c", None, None, None) == 0
    # A user name given must still be right (Mosquitto does the same).
    assert await authn.authenticate("c", "alice", b"x", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert await authn.authenticate("c", "eve", b"x", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD


async def test_anonymous_refused_without_any_source():
    authn, _ = build_security(cfg(allow_anonymous=False))
    assert await authn.authenticate("c", None, None, None) == ReasonCode.NOT_AUTHORIZED
    assert await authn.authenticate("c", "u", b"p", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD


async def test_reload_reaches_both(tmp_path):
    pw = tmp_path / "pw"
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic read a/#\n")
    authn, authz = build_security(cfg(password_file=write_pw(pw, alice="a"), acl_file=str(acl)))
    assert isinstance(authz, AclAuthorizer)
    assert not authz.can_subscribe("c", "alice", "b/#")
    write_pw(pw, alice="b")
    acl.write_text("user alice\ntopic read b/#\n")
    gen = authz.generation
    authn.reload()
    authz.reload()
    assert authz.generation == gen + 1
    assert await authn.authenticate("c", "alice", b"b", None) == 0
    assert authz.can_subscribe("c", "alice", "b/#")
    assert not authz.can_subscribe("c", "alice", "a/#")


# ------------------------------------------------------------ plug-ins
#
# The example plug-in: a compact HMAC-signed token (header.payload.signature,
# base64url, HS256, like a JWT) passed as the MQTT password. The user name
# must equal the token's "sub" and the token must not have expired. A real
# deployment would point ``auth_plugin`` at its own module the same way.

SECRET = b"test-secret"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(sub: str, exp: float, secret: bytes = SECRET) -> bytes:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps({"sub": sub, "exp": exp}).encode())
    sig = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(sig)}".encode()


class TokenAuthenticator:
    """Example auth plug-in: HS256 tokens in the password field."""

    def __init__(self, config):
        self.secret = getattr(config, "token_secret", SECRET)

    async def authenticate(self, client_id, username, password, connect):
        try:
            header, payload, sig = (password or b"").decode().split(".")
            want = hmac.new(self.secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(_b64url(want), sig):
                return 0x86
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, UnicodeDecodeError):
            return 0x86
        if claims.get("exp", 0) < time.time():
            return 0x86
        if username is not None and claims.get("sub") != username:
            return 0x87
        return 0


class ChatMembership:
    """Example ACL plug-in: dynamic channel membership; defers other topics."""

    members = {"general": {"alice"}}

    def __init__(self, config):
        pass

    def _channel(self, topic):
        parts = topic.split("/")
        if len(parts) == 4 and parts[2] == "channel":
            return parts[3]
        return None

    def can_subscribe(self, client_id, username, topic_filter):
        ch = self._channel(topic_filter)
        return None if ch is None else username in self.members.get(ch, ())

    can_publish = can_receive = can_subscribe


async def test_token_plugin_by_dotted_path():
    authn, _ = build_security(cfg(auth_plugin=f"{__name__}:TokenAuthenticator"))
    assert not isinstance(authn, AllowAll)
    good = make_token("alice", time.time() + 60)
    assert await authn.authenticate("c", "alice", good, None) == 0
    assert await authn.authenticate("c", "bob", good, None) == ReasonCode.NOT_AUTHORIZED
    assert await authn.authenticate("c", "alice", make_token("alice", time.time() - 1), None) == 0x86
    assert await authn.authenticate("c", "alice", make_token("alice", time.time() + 60, b"x"), None) == 0x86
    assert await authn.authenticate("c", "alice", b"garbage", None) == 0x86
    # Anonymous refused by default when a plug-in is set, unless the token alone
    # is good (MQTT 5 allows a password without a user name).
    assert await authn.authenticate("c", None, None, None) == ReasonCode.NOT_AUTHORIZED
    assert await authn.authenticate("c", None, good, None) == 0


async def test_password_file_then_plugin(tmp_path):
    authn, _ = build_security(cfg(password_file=write_pw(tmp_path / "pw", svc="backend"),
                                  auth_plugin=f"{__name__}.TokenAuthenticator"))
    assert await authn.authenticate("c", "svc", b"backend", None) == 0
    assert await authn.authenticate("c", "alice", make_token("alice", time.time() + 60), None) == 0
    assert await authn.authenticate("c", "alice", b"backend", None) == 0x86


async def test_acl_plugin_defers_to_file(tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("pattern read app/ws/user/%u\n")
    _, authz = build_security(cfg(acl_file=str(acl), acl_plugin=f"{__name__}:ChatMembership"))
    assert isinstance(authz, ChainAuthorizer)
    assert authz.can_subscribe("c", "alice", "app/ws/channel/general")
    assert not authz.can_subscribe("c", "bob", "app/ws/channel/general")
    ChatMembership.members["general"].add("bob")  # membership changes at run time
    try:
        assert authz.can_subscribe("c", "bob", "app/ws/channel/general")
    finally:
        ChatMembership.members["general"].discard("bob")
    assert authz.can_subscribe("c", "bob", "app/ws/user/bob")  # plug-in deferred to the file
    assert not authz.can_subscribe("c", "bob", "app/ws/user/alice")
    assert not authz.can_publish("c", "alice", "$SYS/broker/uptime")


def test_load_object_errors():
    assert load_object("fastmqtt.broker.security:RateLimiter") is RateLimiter
    assert load_object("fastmqtt.broker.security.RateLimiter") is RateLimiter
    with pytest.raises(ImportError):
        load_object("fastmqtt.broker.security:Nope")
    with pytest.raises(ImportError):
        load_object("nodots")


async def test_chain_without_members_and_anonymous():
    chain = ChainAuthenticator([], allow_anonymous=True)
    assert await chain.authenticate("c", None, None, None) == 0
    assert await chain.authenticate("c", "u", b"p", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD


# ------------------------------------------------------------ rate limiter

def test_rate_limiter_burst_then_rate():
    rl = RateLimiter(10, burst=5)
    t = 100.0
    assert [rl.allow(t) for _ in range(6)] == [True] * 5 + [False]
    assert not rl.allow(t + 0.05)  # half a token back
    assert rl.allow(t + 0.1)  # one token back
    assert not rl.allow(t + 0.1)
    # Long idle refills only up to the burst.
    assert sum(rl.allow(t + 1000) for _ in range(20)) == 5


def test_rate_limiter_default_burst_and_clock_going_back():
    rl = RateLimiter(2)
    assert rl.burst == 2
    assert rl.allow(10) and rl.allow(10) and not rl.allow(10)
    assert not rl.allow(5)  # a clock that steps back gives no tokens
    assert rl.allow(10.5)


def test_rate_limiter_sustained_rate():
    rl = RateLimiter(50, burst=1)
    allowed = sum(rl.allow(i / 1000) for i in range(10_000))  # 10 s at 1 kHz
    assert 495 <= allowed <= 505


@pytest.mark.parametrize("rate,burst", [(0, None), (-1, None), (1, 0.5)])
def test_rate_limiter_rejects_bad_arguments(rate, burst):
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


# ------------------------------------------------------------ SIGHUP

async def test_sighup_reloader(tmp_path):
    import os
    import signal

    from fastmqtt.broker.security import sighup_reloader

    pw = tmp_path / "pw"
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic read a/#\n")
    authn, authz = build_security(cfg(password_file=write_pw(pw, alice="old"), acl_file=str(acl)))
    reloaded = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(sighup_reloader, authn, authz, reloaded.set)
            write_pw(pw, alice="new")
            acl.write_text("user alice\ntopic read b/#\n")
            os.kill(os.getpid(), signal.SIGHUP)
            await reloaded.wait()
            n.cancel_scope.cancel()
    assert await authn.authenticate("c", "alice", b"new", None) == 0
    assert await authn.authenticate("c", "alice", b"old", None) == 0x86
    assert authz.can_subscribe("c", "alice", "b/x") and not authz.can_subscribe("c", "alice", "a/x")


async def test_unknown_user_costs_a_hash_too(tmp_path, monkeypatch):
    """An unknown user name takes a hash like a known one (no timing oracle
    for which user names exist)."""
    a = PasswordFileAuthenticator(write_pw(tmp_path / "pw", alice="good"))
    calls = []
    real = auth_mod.verify_password
    monkeypatch.setattr(auth_mod, "verify_password", lambda e, p: calls.append(e.username) or real(e, p))
    assert await a.authenticate("c", "mallory", b"guess", None) == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert len(calls) == 1


def test_sighup_reloader_off_the_main_thread_just_starts():
    """An embedded broker running trio in a worker thread gets no signal
    handler, and the task returns instead of crashing the broker."""
    import threading

    from fastmqtt.broker.security import sighup_reloader

    result = []

    def run():
        async def main():
            async with trio.open_nursery() as n:
                await n.start(sighup_reloader, AllowAll(), AllowAll())
            result.append("returned")
        trio.run(main)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert result == ["returned"]
