"""fastmqtt-passwd and the password file format, cross-checked with Mosquitto.

Hashes written by ``fastmqtt-passwd`` must verify in our parser *and* in a real
Mosquitto broker; hashes written by the real ``mosquitto_passwd`` must verify
in our parser.
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from fastmqtt.broker import passwd
from fastmqtt.broker.auth import (
    hash_password,
    load_password_file,
    parse_password_line,
    verify_password,
)

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def run_cli(*args):
    """Run fastmqtt-passwd as a program, the way an operator does."""
    return subprocess.run([sys.executable, "-m", "fastmqtt.broker.passwd", *args],
                          capture_output=True, text=True, timeout=30)


def test_create_and_verify(tmp_path):
    f = tmp_path / "pw"
    assert run_cli("-c", "-b", str(f), "alice", "s3cret").returncode == 0
    entries = load_password_file(f)
    assert list(entries) == ["alice"]
    e = entries["alice"]
    assert e.scheme == "7" and e.iterations >= 101 and len(e.salt) == 12 and len(e.digest) == 64
    assert verify_password(e, b"s3cret")
    assert not verify_password(e, b"s3cret ")
    assert not verify_password(e, b"")
    assert (os.stat(f).st_mode & 0o777) == 0o600


def test_update_add_delete(tmp_path):
    f = str(tmp_path / "pw")
    assert passwd.main(["-c", "-b", f, "alice", "one"]) == 0
    assert passwd.main(["-b", f, "bob", "two"]) == 0
    old_alice = load_password_file(f)["alice"]
    assert passwd.main(["-b", f, "alice", "three"]) == 0
    entries = load_password_file(f)
    assert sorted(entries) == ["alice", "bob"]
    assert entries["alice"] != old_alice
    assert verify_password(entries["alice"], b"three") and not verify_password(entries["alice"], b"one")
    assert verify_password(entries["bob"], b"two")
    assert passwd.main(["-D", f, "alice"]) == 0
    assert sorted(load_password_file(f)) == ["bob"]
    assert passwd.main(["-D", f, "alice"]) == 1  # not there any more


def test_comments_and_order_are_kept(tmp_path):
    f = tmp_path / "pw"
    f.write_text("# operators\n\n" + "zed:" + hash_password("z") + "\n")
    assert passwd.main(["-b", str(f), "amy", "a"]) == 0
    lines = f.read_text().splitlines()
    assert lines[0] == "# operators" and lines[1] == "" and lines[2].startswith("zed:$7$")
    assert lines[3].startswith("amy:$7$")


def test_create_overwrites(tmp_path):
    f = str(tmp_path / "pw")
    passwd.main(["-c", "-b", f, "alice", "one"])
    passwd.main(["-c", "-b", f, "bob", "two"])
    assert list(load_password_file(f)) == ["bob"]


@pytest.mark.parametrize("args", [
    ["-c", "-D", "{f}", "alice"],            # mosquitto_passwd refuses -c with -D
    ["{f}", "alice", "pw"],                  # password on the command line needs -b
    ["-b", "{f}", "alice"],                  # -b needs the password
    ["-b", "{f}", "al:ice", "pw"],           # ':' separates user and hash
    ["-I", "0", "-b", "{f}", "alice", "pw"],
])
def test_bad_usage(tmp_path, args):
    f = tmp_path / "pw"
    f.write_text("")
    assert passwd.main([a.format(f=f) for a in args]) == 1


def test_missing_file_without_create(tmp_path):
    r = run_cli("-b", str(tmp_path / "nope"), "alice", "pw")
    assert r.returncode != 0
    assert "-c" in r.stderr
    assert not (tmp_path / "nope").exists()


def test_sha512_scheme(tmp_path):
    f = str(tmp_path / "pw")
    assert passwd.main(["-H", "sha512", "-c", "-b", f, "old", "pw"]) == 0
    e = load_password_file(f)["old"]
    assert e.scheme == "6"
    assert open(f).read().startswith("old:$6$")
    assert verify_password(e, "pw") and not verify_password(e, "px")


def test_interactive_prompt(tmp_path, monkeypatch):
    f = str(tmp_path / "pw")
    answers = iter(["typed", "typed"])
    monkeypatch.setattr(passwd.getpass, "getpass", lambda prompt="": next(answers))
    assert passwd.main(["-c", f, "alice"]) == 0
    assert verify_password(load_password_file(f)["alice"], "typed")
    answers2 = iter(["one", "two"])
    monkeypatch.setattr(passwd.getpass, "getpass", lambda prompt="": next(answers2))
    with pytest.raises(SystemExit):
        passwd.main([f, "alice"])
    assert verify_password(load_password_file(f)["alice"], "typed")  # unchanged


def test_upgrade_plain_text(tmp_path):
    f = tmp_path / "pw"
    f.write_text("alice:plain1\nbob:" + hash_password("b") + "\n")
    assert passwd.main(["-U", str(f)]) == 0
    entries = load_password_file(f)
    assert verify_password(entries["alice"], "plain1")
    assert verify_password(entries["bob"], "b")


def test_known_vector():
    """A fixed salt gives a fixed hash: PBKDF2-HMAC-SHA512, 64-byte key, base64."""
    line = "u:" + hash_password("pw", iterations=101, salt=b"\x00" * 12)
    e = parse_password_line(line)
    assert line.startswith("u:$7$101$AAAAAAAAAAAAAAAA$")
    assert verify_password(e, "pw")


@pytest.mark.parametrize("line", [
    "nocolon",
    "u:$7$x$AAAA$AAAA",
    "u:$7$0$AAAA$AAAA",
    "u:$7$101$!!!$AAAA",
    "u:$5$abc$def",
    "u:plaintext",
    ":$6$AAAA$AAAA",
])
def test_bad_lines_raise(line):
    with pytest.raises(ValueError):
        parse_password_line(line)


def test_bad_lines_are_skipped_not_fatal(tmp_path):
    f = tmp_path / "pw"
    f.write_text("broken\nalice:" + hash_password("a") + "\nbob:plain\n")
    assert list(load_password_file(f)) == ["alice"]


@pytest.mark.parametrize("algo,scheme", [("sha512-pbkdf2", "7"), ("sha512", "6")])
def test_reads_mosquitto_passwd_files(tmp_path, algo, scheme):
    f = tmp_path / "pw"
    subprocess.run([MOSQUITTO_PASSWD, "-H", algo, "-c", "-b", str(f), "alice", "wonder land"],
                   check=True, timeout=30, capture_output=True)
    subprocess.run([MOSQUITTO_PASSWD, "-H", algo, "-b", str(f), "bob", "pässwörd"],
                   check=True, timeout=30, capture_output=True)
    entries = load_password_file(f)
    assert entries["alice"].scheme == scheme
    assert verify_password(entries["alice"], "wonder land")
    assert not verify_password(entries["alice"], "wonderland")
    assert verify_password(entries["bob"], "pässwörd".encode())


def test_mosquitto_passwd_can_edit_our_file(tmp_path):
    """mosquitto_passwd updates a file we wrote and leaves our line usable."""
    f = str(tmp_path / "pw")
    passwd.main(["-c", "-b", f, "ours", "a"])
    subprocess.run([MOSQUITTO_PASSWD, "-b", f, "theirs", "b"], check=True, timeout=30,
                   capture_output=True)
    entries = load_password_file(f)
    assert verify_password(entries["ours"], "a") and verify_password(entries["theirs"], "b")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _paho_connect(port, username, password):
    import paho.mqtt.client as mqtt

    result = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pwcheck",
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(username, password)
    c.on_connect = lambda client, userdata, flags, rc, props: result.append(int(rc.value))
    c.connect("127.0.0.1", port)
    deadline = time.monotonic() + 10
    while not result and time.monotonic() < deadline:
        c.loop(timeout=0.1)
    c.disconnect()
    return result[0] if result else None


def _wait_for_line(proc, needle, timeout):
    """Read the broker's log until it says it listens (bounded by ``timeout``)."""
    import selectors

    sel = selectors.DefaultSelector()
    fd = proc.stdout.fileno()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(fd, 4096)  # raw reads: a buffered readline would hide lines from select
        if not chunk:
            break
        seen += chunk
        if needle.encode() in seen:
            return
    seen = seen.decode(errors="replace")
    raise AssertionError("mosquitto did not start: " + seen)


@pytest.mark.integration
def test_mosquitto_accepts_our_hashes(tmp_path):
    """The real Mosquitto broker authenticates against a file fastmqtt-passwd wrote."""
    f = str(tmp_path / "pw")
    passwd.main(["-c", "-b", f, "alice", "good"])
    passwd.main(["-H", "sha512", "-b", f, "old", "legacy"])
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    # As root Mosquitto drops to user "mosquitto", which cannot read tmp_path;
    # it logs to stderr because its stdout is block-buffered into a pipe.
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {f}\n"
                    f"{user}log_dest stderr\nlog_type all\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        # "Opening ... listen socket" is logged before the bind; "running"
        # only once every listener accepts connections.
        _wait_for_line(proc, " running", timeout=10)
        assert _paho_connect(port, "alice", "good") == 0
        assert _paho_connect(port, "old", "legacy") == 0
        assert _paho_connect(port, "alice", "bad") != 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_console_script_points_at_main():
    """pyproject's ``fastmqtt-passwd`` entry resolves to this module's main()."""
    import tomllib
    from pathlib import Path

    from fastmqtt.broker.security import load_object

    data = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert load_object(data["project"]["scripts"]["fastmqtt-passwd"]) is passwd.main
