"""The batch-and-commit shell, in process, with its database and MqttIo faked
(the real ones are exercised in test_faults.py): what happens when a write
conflicts with another writer."""

import contextlib

import psycopg
from psycopg import errors

from hydrod.actors.base import Address, Backoff, Context
from hydrod.actors.consumer import BatchConsumer
from hydrod.actors.mqtt_io import Settled
from hydrod.metrics import Metrics
from hydrod.protocol import Routed


class Conflicting(BatchConsumer):
    """Fails its first writes with the given errors, then succeeds."""

    def __init__(self, failures):
        self.mqtt_told = []
        mqtt = Address("mqtt_io")
        mqtt.tell = self.mqtt_told.append
        super().__init__(Context("writer", Address("writer"), Address("supervisor")), dsn="", pool_size=(1, 1),
                         mqtt=mqtt, metrics=Metrics(), batch_size=100, flush_interval=1.0,
                         retry=Backoff(60, 60))
        self.failures = list(failures)
        self.writes = 0

    @contextlib.contextmanager
    def transaction(self):
        yield None

    def write(self, cur, items):
        self.writes += 1
        if self.failures:
            raise self.failures.pop(0)
        return []


def items(n):
    return [Routed(seq, "telemetry", "gh", "zn", "nd", "ch", "t", b"{}", 0.0) for seq in range(n)]


def test_a_deadlock_or_serialization_failure_is_retried_at_once_not_taken_for_an_outage():
    writer = Conflicting([errors.DeadlockDetected("deadlock"), errors.SerializationFailure("serialize")])
    writer._pending = items(3)
    writer.flush()
    assert writer.writes == 3
    assert writer.mqtt_told == [Settled((0, 1, 2))]
    assert writer._db_ok and not writer._waiting_retry and writer._pending == []


def test_a_conflict_that_persists_is_treated_as_an_outage_and_nothing_is_settled():
    writer = Conflicting([errors.DeadlockDetected("deadlock")] * 3)
    writer._pending = items(3)
    writer.flush()
    assert writer.mqtt_told == []
    assert not writer._db_ok and writer._waiting_retry and len(writer._pending) == 3


def test_a_lost_connection_is_an_outage_at_once():
    writer = Conflicting([psycopg.OperationalError("server closed the connection")])
    writer._pending = items(2)
    writer.flush()
    assert writer.writes == 1 and writer.mqtt_told == [] and not writer._db_ok
