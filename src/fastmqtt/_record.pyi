"""Type stubs for the SQLite store's compiled change recorder (``_record.pyx``)."""

from collections import OrderedDict
from typing import Any, Callable

class Lock:
    def __enter__(self) -> Lock: ...
    def __exit__(self, *exc: object) -> bool: ...

class Batch:
    ops: int
    seq: int
    lsn: int
    cascade: set[str]
    sessions: dict[str, tuple]
    subs: dict[str, dict[str, tuple | None]]
    deliv: dict[str, dict[int, list]]
    qos2: dict[str, dict[int, bool]]
    messages: dict[int, tuple[Any, float | None]]
    msg_del: set[int]
    retained: dict[str, tuple | None]
    wills: dict[str, tuple | None]
    hist_put: dict[int, tuple]
    hist_del: set[int]
    def __init__(self) -> None: ...
    def empty(self) -> bool: ...

class Recorder:
    _lock: Lock
    _batch: Batch
    _seq: int
    _first: int
    _dseq: int
    _refs: dict[int, int]
    _client_msgs: dict[str, set[int]]
    _msgs: dict[int, tuple]
    _released: OrderedDict[int, tuple]
    _released_kept: int
    _extra: Callable[[bool, tuple], str | None]
    _sent: int
    _cancelled: int
    def put_message(self, msg_id: int, publish: Any, expires_at: float | None) -> None: ...
    def add_delivery(self, client_id: str, delivery: Any) -> None: ...
    def update_delivery(self, client_id: str, delivery: Any) -> None: ...
    def remove_delivery(self, client_id: str, msg_id: int) -> None: ...
    def _decref(self, b: Batch, msg_id: int) -> None: ...
    def _revive(self, b: Batch, msg_id: int) -> None: ...
    def _schedule(self) -> None: ...
    def _unknown_message(self, msg_id: int) -> None: ...

def encode_messages(messages: dict[int, tuple[Any, float | None]],
                    encode: Callable[[Any], bytes],
                    blob: Callable[[str, Any, Any], bytes | None]) -> dict: ...
