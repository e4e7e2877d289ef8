"""Drives the Service Bus test broker with Microsoft's Python SDK (azure-servicebus), unpatched.

Usage:
    python suite.py --entities          print the broker's entity flags, one per line
    python suite.py CONNECTION_STRING   run every test against a broker started with them

Each test uses entities of its own. A test marked with `expected_failure(cause)` shows a known
difference from Service Bus, named by its cause: it is reported as an expected failure while it
fails, and counts as a failure once it passes (so that the mark is removed). The exit status is
non-zero if any test failed unexpectedly.
"""

import datetime
import logging
import os
import sys
import threading
import time
import traceback
import uuid

from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import MessageLockLostError, ServiceBusError

# SB_COMPAT_TRACE=1 logs every AMQP frame the SDK sends and receives.
TRACE = os.environ.get("SB_COMPAT_TRACE") == "1"
if TRACE:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)

# Seconds a single test may take before it counts as failed (hung).
TEST_TIMEOUT = 40
# Seconds a receive waits for a message that must be there.
WAIT = 5

ENTITIES = [
    "--queue", "send-complete",
    "--queue", "properties",
    "--queue", "abandon",
    "--queue", "dead-letter",
    "--queue", "schedule",
    "--queue", "schedule-fire",
    "--queue", "renew,lock=2",
    "--queue", "expiry,lock=1",
    "--queue", "max-delivery,max-delivery=2",
    "--queue", "receive-delete",
    "--queue", "batch",
    "--topic", "fanout",
    "--subscription", "fanout/a",
    "--subscription", "fanout/b",
    "--queue", "peek",
    "--queue", "peek-scheduled",
    "--queue", "defer",
    "--queue", "no-sessions",
    "--queue", "dead-letter-twice,lock=2",
    "--queue", "cancel-fired",
    "--queue", "large",
    "--queue", "sessions",
    "--queue", "retrying-send",
]

# Set by main: for tests that need a client configured differently.
CONNECTION_STRING = None

TESTS = []


def compat_test(function):
    TESTS.append((function, None))
    return function


def expected_failure(cause):
    def mark(function):
        TESTS.append((function, cause))
        return function

    return mark


class Failure(AssertionError):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


def equal(actual, expected, what):
    check(actual == expected, f"{what}: expected {expected!r}, got {actual!r}")


def body_of(message):
    return b"".join(message.body)


def receive_one(receiver, wait=WAIT):
    messages = receiver.receive_messages(max_message_count=1, max_wait_time=wait)
    check(len(messages) == 1, f"expected one message within {wait} s, got {len(messages)}")
    return messages[0]


def receive_none(receiver, wait=1):
    messages = receiver.receive_messages(max_message_count=1, max_wait_time=wait)
    check(not messages, f"expected no message, got {[body_of(m) for m in messages]}")


def send(client, queue, *bodies):
    with client.get_queue_sender(queue) as sender:
        for body in bodies:
            sender.send_messages(ServiceBusMessage(body))


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def wait_until(moment):
    """Waits for a point of wall-clock time (lock expiry is what these tests are about)."""
    delay = (moment - utc_now()).total_seconds()
    if delay > 0:
        time.sleep(delay)


# ----- the five blocking items and the required operations --------------------------------


@compat_test
def send_peek_lock_receive_complete(client):
    send(client, "send-complete", b"hello")
    with client.get_queue_receiver("send-complete") as receiver:
        message = receive_one(receiver)
        equal(body_of(message), b"hello", "body")
        check(isinstance(message.lock_token, (uuid.UUID, str)), f"lock token {message.lock_token!r}")
        check(message.locked_until_utc > utc_now(), "locked_until lies ahead")
        check(message.sequence_number is not None, "sequence number present")
        receiver.complete_message(message)
        receive_none(receiver)


@compat_test
def message_properties_survive(client):
    message_id = str(uuid.uuid4())
    with client.get_queue_sender("properties") as sender:
        sender.send_messages(
            ServiceBusMessage(
                b"payload",
                message_id=message_id,
                subject="the-subject",
                correlation_id="corr",
                content_type="application/octet-stream",
                application_properties={"attempt": 3, "kind": "test"},
            )
        )
    with client.get_queue_receiver("properties") as receiver:
        message = receive_one(receiver)
        equal(message.message_id, message_id, "message id")
        equal(message.subject, "the-subject", "subject")
        equal(message.correlation_id, "corr", "correlation id")
        equal(message.content_type, "application/octet-stream", "content type")
        properties = {k.decode() if isinstance(k, bytes) else k: v for k, v in message.application_properties.items()}
        equal(properties.get("attempt"), 3, "application property attempt")
        kind = properties.get("kind")
        equal(kind.decode() if isinstance(kind, bytes) else kind, "test", "application property kind")
        check(message.enqueued_time_utc is not None, "enqueued time present")
        receiver.complete_message(message)


@compat_test
def first_delivery_count_is_zero_and_abandon_adds_one(client):
    send(client, "abandon", b"again")
    with client.get_queue_receiver("abandon") as receiver:
        first = receive_one(receiver)
        equal(first.delivery_count, 0, "delivery count of the first delivery")
        receiver.abandon_message(first)
        second = receive_one(receiver)
        equal(body_of(second), b"again", "body")
        equal(second.delivery_count, 1, "delivery count after one abandon")
        equal(second.sequence_number, first.sequence_number, "same message")
        check(second.lock_token != first.lock_token, "a new lock token for a new delivery")
        receiver.complete_message(second)
        receive_none(receiver)


@compat_test
def dead_letter_with_reason_and_description(client):
    send(client, "dead-letter", b"poison")
    with client.get_queue_receiver("dead-letter") as receiver:
        message = receive_one(receiver)
        receiver.dead_letter_message(message, reason="bad-input", error_description="field x is missing")
        receive_none(receiver)
    with client.get_queue_receiver("dead-letter", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        letter = receive_one(dlq)
        equal(body_of(letter), b"poison", "body")
        equal(letter.dead_letter_reason, "bad-input", "dead-letter reason")
        equal(letter.dead_letter_error_description, "field x is missing", "dead-letter description")
        dlq.complete_message(letter)
        receive_none(dlq)


@compat_test
def schedule_and_cancel(client):
    with client.get_queue_sender("schedule") as sender:
        numbers = sender.schedule_messages(ServiceBusMessage(b"later"), utc_now() + datetime.timedelta(minutes=5))
        equal(len(numbers), 1, "sequence numbers returned")
        sender.cancel_scheduled_messages(numbers)
    with client.get_queue_receiver("schedule") as receiver:
        equal(receiver.peek_messages(max_message_count=10), [], "nothing left after cancelling")


@compat_test
def scheduled_message_arrives_on_time(client):
    at = utc_now() + datetime.timedelta(seconds=1)
    with client.get_queue_sender("schedule-fire") as sender:
        sender.schedule_messages(ServiceBusMessage(b"on time"), at)
    with client.get_queue_receiver("schedule-fire") as receiver:
        message = receive_one(receiver, wait=WAIT + 1)
        equal(body_of(message), b"on time", "body")
        # Enqueued time has millisecond precision on the wire.
        check(utc_now() >= at - datetime.timedelta(milliseconds=5), "not delivered before its time")
        receiver.complete_message(message)


@compat_test
def renew_lock(client):
    send(client, "renew", b"slow work")
    with client.get_queue_receiver("renew") as receiver:
        message = receive_one(receiver)
        first_until = message.locked_until_utc
        time.sleep(1)
        renewed_until = receiver.renew_message_lock(message)
        check(renewed_until > first_until, f"renewed lock {renewed_until} ends after {first_until}")
        equal(message.locked_until_utc, renewed_until, "message knows its new lock")
        # Past the first lock's end, the renewed lock still holds: completing works and the
        # message is not delivered again.
        wait_until(first_until + datetime.timedelta(milliseconds=300))
        receiver.complete_message(message)
        receive_none(receiver, wait=2)


@compat_test
def lock_expiry_redelivers(client):
    send(client, "expiry", b"too slow")
    with client.get_queue_receiver("expiry") as receiver:
        first = receive_one(receiver)
        wait_until(first.locked_until_utc + datetime.timedelta(milliseconds=200))
        second = receive_one(receiver)
        equal(second.sequence_number, first.sequence_number, "same message")
        equal(second.delivery_count, 1, "delivery count after the lock expired")
        try:
            receiver.complete_message(first)
        except MessageLockLostError:
            pass
        else:
            raise Failure("completing with an expired lock succeeded")
        receiver.complete_message(second)
        receive_none(receiver)


@compat_test
def max_delivery_count_dead_letters(client):
    send(client, "max-delivery", b"fails twice")
    with client.get_queue_receiver("max-delivery") as receiver:
        for _ in range(2):
            receiver.abandon_message(receive_one(receiver))
        receive_none(receiver)
    with client.get_queue_receiver("max-delivery", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        letter = receive_one(dlq)
        equal(body_of(letter), b"fails twice", "body")
        equal(letter.dead_letter_reason, "MaxDeliveryCountExceeded", "dead-letter reason")
        dlq.complete_message(letter)


@compat_test
def receive_and_delete(client):
    send(client, "receive-delete", b"one", b"two")
    with client.get_queue_receiver("receive-delete", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
        bodies = []
        deadline = time.time() + WAIT
        while len(bodies) < 2 and time.time() < deadline:
            bodies += [body_of(m) for m in receiver.receive_messages(max_message_count=2, max_wait_time=WAIT)]
        equal(bodies, [b"one", b"two"], "bodies in order")
    with client.get_queue_receiver("receive-delete") as receiver:
        receive_none(receiver)


@compat_test
def batch_send(client):
    with client.get_queue_sender("batch") as sender:
        batch = sender.create_message_batch()
        for i in range(5):
            batch.add_message(ServiceBusMessage(f"m{i}".encode()))
        sender.send_messages(batch)
        sender.send_messages([ServiceBusMessage(b"l0"), ServiceBusMessage(b"l1")])
    with client.get_queue_receiver("batch") as receiver:
        bodies = []
        deadline = time.time() + WAIT
        while len(bodies) < 7 and time.time() < deadline:
            for message in receiver.receive_messages(max_message_count=7, max_wait_time=WAIT):
                bodies.append(body_of(message))
                receiver.complete_message(message)
        equal(bodies, [b"m0", b"m1", b"m2", b"m3", b"m4", b"l0", b"l1"], "bodies in order")


@compat_test
def topic_fan_out(client):
    with client.get_topic_sender("fanout") as sender:
        sender.send_messages(ServiceBusMessage(b"to all"))
    for subscription in ("a", "b"):
        with client.get_subscription_receiver("fanout", subscription) as receiver:
            message = receive_one(receiver)
            equal(body_of(message), b"to all", f"body in subscription {subscription}")
            receiver.complete_message(message)
            receive_none(receiver)


@compat_test
def peek(client):
    send(client, "peek", b"p0", b"p1", b"p2")
    with client.get_queue_receiver("peek") as receiver:
        peeked = receiver.peek_messages(max_message_count=3)
        equal([body_of(m) for m in peeked], [b"p0", b"p1", b"p2"], "peeked bodies")
        numbers = [m.sequence_number for m in peeked]
        equal(numbers, sorted(numbers), "sequence numbers ascending")
        later = receiver.peek_messages(max_message_count=3, sequence_number=numbers[1])
        equal([body_of(m) for m in later], [b"p1", b"p2"], "peek from a sequence number")
        message = receive_one(receiver)
        equal(body_of(message), b"p0", "peeking did not take the message")
        receiver.complete_message(message)


@compat_test
def defer(client):
    send(client, "defer", b"not now")
    with client.get_queue_receiver("defer") as receiver:
        message = receive_one(receiver)
        number = message.sequence_number
        receiver.defer_message(message)
        receive_none(receiver)
        deferred = receiver.receive_deferred_messages([number])
        equal([body_of(m) for m in deferred], [b"not now"], "deferred message by sequence number")
        receiver.complete_message(deferred[0])
        try:
            receiver.receive_deferred_messages([number])
        except ServiceBusError:
            pass
        else:
            raise Failure("a completed deferred message could be received again")


@compat_test
def large_message_round_trip(client):
    body = bytes(range(256)) * 800  # 200 KiB: below the 256 KiB limit of the standard tier
    send(client, "large", body)
    with client.get_queue_receiver("large") as receiver:
        message = receive_one(receiver)
        equal(len(body_of(message)), len(body), "body length")
        check(body_of(message) == body, "body intact")
        receiver.complete_message(message)


@expected_failure("the test broker does not emulate sessions: no entity requires them")
def session_send_and_receive(client):
    with client.get_queue_sender("sessions") as sender:
        sender.send_messages(ServiceBusMessage(b"in a session", session_id="s1"))
    with client.get_queue_receiver("sessions", session_id="s1") as receiver:
        message = receive_one(receiver)
        equal(message.session_id, "s1", "session id")
        receiver.complete_message(message)


@compat_test
def a_retrying_client_stores_a_send_once(client):
    # With the SDK's default retries a send that is never confirmed is sent again: the broker
    # must confirm it (settle it), or the message is stored twice.
    with ServiceBusClient.from_connection_string(CONNECTION_STRING, logging_enable=TRACE) as retrying:
        with retrying.get_queue_sender("retrying-send") as sender:
            sender.send_messages(ServiceBusMessage(b"once"), timeout=10)
    with client.get_queue_receiver("retrying-send") as receiver:
        peeked = receiver.peek_messages(max_message_count=10)
        equal([body_of(m) for m in peeked], [b"once"], "stored messages")


# ----- smaller differences from Service Bus -------------------------------------------------


@compat_test
def scheduled_message_gets_a_new_sequence_number_and_is_peekable(client):
    at = utc_now() + datetime.timedelta(seconds=3)
    with client.get_queue_sender("peek-scheduled") as sender:
        (number,) = sender.schedule_messages(ServiceBusMessage(b"scheduled"), at)
    with client.get_queue_receiver("peek-scheduled") as receiver:
        peeked = receiver.peek_messages(max_message_count=5)
        equal([body_of(m) for m in peeked], [b"scheduled"], "peek shows the scheduled message")
        equal(peeked[0].sequence_number, number, "peeked sequence number")
        message = receive_one(receiver, wait=WAIT + 3)
        check(message.sequence_number != number, "activation assigns a new sequence number")
        receiver.complete_message(message)


@compat_test
def session_receiver_on_entity_without_sessions_is_refused(client):
    try:
        with client.get_queue_receiver("no-sessions", session_id="s1") as receiver:
            receiver.receive_messages(max_message_count=1, max_wait_time=1)
    except ServiceBusError:
        return
    raise Failure("a session receiver attached to a queue without sessions")


@compat_test
def dead_lettering_a_dead_letter_fails(client):
    send(client, "dead-letter-twice", b"twice")
    with client.get_queue_receiver("dead-letter-twice") as receiver:
        receiver.dead_letter_message(receive_one(receiver), reason="first")
    with client.get_queue_receiver("dead-letter-twice", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        letter = receive_one(dlq)
        try:
            dlq.dead_letter_message(letter, reason="second")
        except ServiceBusError:
            pass
        else:
            raise Failure("dead-lettering a message of a dead-letter queue succeeded")
    # The SDK shuts the receiver down after the refusal; the message stays in the dead-letter
    # queue and is delivered again once its lock (2 s) ends.
    with client.get_queue_receiver("dead-letter-twice", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        again = receive_one(dlq, wait=WAIT)
        equal(body_of(again), b"twice", "body")
        equal(again.dead_letter_reason, "first", "reason unchanged")
        dlq.complete_message(again)


@compat_test
def cancelling_a_schedule_that_fired_fails(client):
    at = utc_now() + datetime.timedelta(milliseconds=500)
    with client.get_queue_sender("cancel-fired") as sender:
        numbers = sender.schedule_messages(ServiceBusMessage(b"fired"), at)
        with client.get_queue_receiver("cancel-fired") as receiver:
            message = receive_one(receiver, wait=WAIT)
            try:
                sender.cancel_scheduled_messages(numbers)
            except ServiceBusError:
                pass
            else:
                raise Failure("cancelling a schedule that already fired succeeded")
            receiver.complete_message(message)


# ----- runner -----------------------------------------------------------------------------


def run_one(function, connection_string):
    outcome = {}

    def target():
        try:
            with ServiceBusClient.from_connection_string(
                connection_string, retry_total=0, logging_enable=TRACE
            ) as client:
                function(client)
            outcome["ok"] = True
        except BaseException as error:  # noqa: BLE001 - every failure is reported
            outcome["error"] = error
            outcome["trace"] = traceback.format_exc()

    thread = threading.Thread(target=target, daemon=True)
    started = time.time()
    thread.start()
    thread.join(TEST_TIMEOUT)
    elapsed = time.time() - started
    if thread.is_alive():
        return False, f"timed out after {TEST_TIMEOUT} s", elapsed
    if outcome.get("ok"):
        return True, None, elapsed
    error = outcome["error"]
    detail = f"{type(error).__name__}: {error}"
    if not isinstance(error, Failure):
        detail += "\n" + outcome["trace"]
    return False, detail, elapsed


def main(argv):
    if len(argv) == 2 and argv[1] == "--entities":
        print("\n".join(ENTITIES))
        return 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    global CONNECTION_STRING
    connection_string = CONNECTION_STRING = argv[1]
    only = set(argv[2:])
    passed = failed = expected = 0
    for function, cause in TESTS:
        if only and function.__name__ not in only:
            continue
        ok, detail, elapsed = run_one(function, connection_string)
        name = function.__name__
        if cause is None and ok:
            passed += 1
            print(f"PASS  {name} ({elapsed:.1f} s)")
        elif cause is None:
            failed += 1
            print(f"FAIL  {name} ({elapsed:.1f} s): {detail}")
        elif ok:
            failed += 1
            print(f"FAIL  {name}: passes now; remove its expected failure ({cause})")
        else:
            expected += 1
            print(f"XFAIL {name}: {cause}\n      {detail.splitlines()[0]}")
        sys.stdout.flush()
    print(f"{passed} passed, {failed} failed, {expected} expected failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
