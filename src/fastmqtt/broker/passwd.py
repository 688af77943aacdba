"""``fastmqtt-passwd``: create and update Mosquitto-compatible password files.

Usage mirrors ``mosquitto_passwd``::

    fastmqtt-passwd [-H sha512-pbkdf2|sha512] [-c | -D] FILE USER
    fastmqtt-passwd [-H ...] [-c] -b FILE USER PASSWORD
    fastmqtt-passwd -U FILE

Files written here are read by Mosquitto and the other way round. The file is
rewritten through a temporary file and ``os.replace`` so a crash never leaves
half a file, and created with mode 0600 (it holds password hashes).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile

from .auth import DEFAULT_ITERATIONS, hash_password, parse_password_line

__all__ = ["main", "update_password_file"]

_SCHEMES = {"sha512-pbkdf2": "7", "sha512": "6"}


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().splitlines()
    except FileNotFoundError:
        raise SystemExit(f"fastmqtt-passwd: {path}: no such file (use -c to create it)") from None


def _write_lines(path: str, lines: list[str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".passwd-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o600
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _line_user(line: str) -> str | None:
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    return line.partition(":")[0]


def update_password_file(path: str, username: str, password: str | None, *, create: bool = False,
                         delete: bool = False, scheme: str = "7",
                         iterations: int = DEFAULT_ITERATIONS) -> bool:
    """Add, update or delete one user.

    Args:
        path: the password file.
        username: the user (must not contain ``:``).
        password: the new password (ignored with ``delete``).
        create: start a new file, replacing any existing one.
        delete: remove the user instead.
        scheme: ``"7"`` (PBKDF2-SHA512) or ``"6"`` (salted SHA-512).
        iterations: PBKDF2 rounds for ``"7"``.

    Returns:
        False when deleting a user that is not there, else True.

    Raises:
        ValueError: for a bad user name.
        SystemExit: when the file does not exist and ``create`` is false.
    """
    if not username or ":" in username or "\n" in username:
        raise ValueError("user names must be non-empty and contain no ':'")
    lines = [] if create else _read_lines(path)
    if delete:
        kept = [line for line in lines if _line_user(line) != username]
        if len(kept) == len(lines):
            return False
        _write_lines(path, kept)
        return True
    assert password is not None
    new_line = f"{username}:{hash_password(password, scheme=scheme, iterations=iterations)}"
    out, replaced = [], False
    for line in lines:
        if _line_user(line) == username:
            if not replaced:
                out.append(new_line)
                replaced = True
            continue
        out.append(line)
    if not replaced:
        out.append(new_line)
    _write_lines(path, out)
    return True


def _upgrade_plain(path: str, scheme: str, iterations: int) -> int:
    """-U: hash every plain-text ``user:password`` line; returns how many."""
    lines = _read_lines(path)
    out, changed = [], 0
    for line in lines:
        user = _line_user(line)
        if user is not None:
            try:
                parse_password_line(line)
            except ValueError:
                plain = line.partition(":")[2]
                line = f"{user}:{hash_password(plain, scheme=scheme, iterations=iterations)}"
                changed += 1
        out.append(line)
    _write_lines(path, out)
    return changed


def _ask_password() -> str:
    first = getpass.getpass("Password: ")
    second = getpass.getpass("Reenter password: ")
    if first != second:
        raise SystemExit("fastmqtt-passwd: passwords do not match")
    return first


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastmqtt-passwd``.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on error.
    """
    parser = argparse.ArgumentParser(
        prog="fastmqtt-passwd",
        description="Manage password files for fastmqtt-broker (compatible with mosquitto_passwd).")
    parser.add_argument("-b", dest="batch", action="store_true",
                        help="batch mode: take the password from the command line")
    parser.add_argument("-c", dest="create", action="store_true",
                        help="create a new password file, overwriting an existing one")
    parser.add_argument("-D", dest="delete", action="store_true", help="delete the user")
    parser.add_argument("-U", dest="upgrade", action="store_true",
                        help="hash a plain-text 'user:password' file in place")
    parser.add_argument("-H", dest="hash", choices=sorted(_SCHEMES), default="sha512-pbkdf2",
                        help="hash algorithm (default sha512-pbkdf2; sha512 is Mosquitto 1.6's)")
    parser.add_argument("-I", dest="iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"PBKDF2 iterations (default {DEFAULT_ITERATIONS})")
    parser.add_argument("file")
    parser.add_argument("username", nargs="?")
    parser.add_argument("password", nargs="?")
    args = parser.parse_args(argv)
    scheme = _SCHEMES[args.hash]
    try:
        if args.iterations < 1:
            raise ValueError("iterations must be >= 1")
        if args.upgrade:
            if args.username or args.create or args.delete or args.batch:
                raise ValueError("-U takes only the file")
            _upgrade_plain(args.file, scheme, args.iterations)
            return 0
        if args.username is None:
            raise ValueError("a user name is needed")
        if args.create and args.delete:
            raise ValueError("-c and -D cannot be used together")
        if args.delete:
            if args.password is not None:
                raise ValueError("-D takes no password")
            if not update_password_file(args.file, args.username, None, delete=True):
                print(f"fastmqtt-passwd: user {args.username} not found", file=sys.stderr)
                return 1
            return 0
        if args.batch:
            if args.password is None:
                raise ValueError("-b needs a password on the command line")
            password = args.password
        else:
            if args.password is not None:
                raise ValueError("a password on the command line needs -b")
            password = _ask_password()
        update_password_file(args.file, args.username, password, create=args.create,
                             scheme=scheme, iterations=args.iterations)
        return 0
    except ValueError as exc:
        print(f"fastmqtt-passwd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fastmqtt-passwd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
