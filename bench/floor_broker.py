"""``fastmqtt-broker`` with a *floor* store, for bench/test_persistence.py.

The floor store says it is persistent, so the broker core does everything it
does for persistent sessions (message ids, a DeliveryRecord per queued or
in-flight message, a store call per change, tickets), but it keeps nothing
and every ticket is durable at once. Its throughput is the ceiling any real
store can reach with this broker: the gap between it and ``--no-persistence``
is the core's own cost of persistent sessions, the gap between it and the
SQLite store the cost of storing.

Run as ``python bench/floor_broker.py <fastmqtt-broker arguments>``.
"""

from __future__ import annotations

import sys

from fastmqtt.broker import cli, server
from fastmqtt.broker.interfaces import Snapshot


class FloorStore:
    persistent = True

    def open(self) -> Snapshot:
        return Snapshot()

    def mark(self) -> int:
        return 0  # everything is durable already

    async def durable(self, ticket: int) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _noop(self, *args, **kwargs) -> None:
        return None

    put_session = delete_session = put_subscription = delete_subscription = _noop
    put_message = add_delivery = update_delivery = remove_delivery = _noop
    add_delivery_fields = update_delivery_fields = put_message_fields = _noop
    put_message_add_delivery = _noop
    put_incoming_qos2 = delete_incoming_qos2 = put_retained = delete_retained = _noop
    put_will = delete_will = put_history = delete_history = _noop

    def load_history(self) -> list:
        return []


if __name__ == "__main__":
    server._open_store = lambda config, stats: FloorStore()
    sys.exit(cli.main(sys.argv[1:]))
