// Drives the Service Bus test broker with Microsoft's JavaScript SDK (@azure/service-bus),
// unpatched. Usage: node suite.js --entities | node suite.js CONNECTION_STRING [TEST...]
// Prints one line per test and "N passed, N failed"; exits non-zero on any failure.
"use strict";
const assert = require("node:assert/strict");
const { ServiceBusClient } = require("@azure/service-bus");

const WAIT = 5000;
const ENTITIES = [
  "--queue", "js-complete",
  "--queue", "js-abandon",
  "--queue", "js-dead-letter",
  "--queue", "js-schedule",
  "--queue", "js-renew,lock=2",
  "--queue", "js-peek",
  "--queue", "js-defer",
  "--queue", "js-receive-delete",
  "--queue", "js-batch",
  "--topic", "js-fanout",
  "--subscription", "js-fanout/a",
  "--subscription", "js-fanout/b",
];

async function receiveOne(receiver) {
  const messages = await receiver.receiveMessages(1, { maxWaitTimeInMs: WAIT });
  assert.equal(messages.length, 1, `expected one message within ${WAIT} ms`);
  return messages[0];
}

async function receiveNone(receiver) {
  const messages = await receiver.receiveMessages(1, { maxWaitTimeInMs: 1000 });
  assert.deepEqual(messages.map((m) => m.body), [], "expected no message");
}

const tests = {
  async send_receive_complete(client) {
    await client.createSender("js-complete").sendMessages({ body: "hello", messageId: "m1" });
    const receiver = client.createReceiver("js-complete");
    const message = await receiveOne(receiver);
    assert.equal(message.body, "hello");
    assert.equal(message.messageId, "m1");
    assert.equal(message.deliveryCount, 0);
    assert.match(message.lockToken, /^[0-9a-f-]{36}$/);
    await receiver.completeMessage(message);
    await receiveNone(receiver);
  },
  async abandon_adds_one_to_the_delivery_count(client) {
    await client.createSender("js-abandon").sendMessages({ body: "again" });
    const receiver = client.createReceiver("js-abandon");
    await receiver.abandonMessage(await receiveOne(receiver));
    const second = await receiveOne(receiver);
    assert.equal(second.deliveryCount, 1);
    await receiver.completeMessage(second);
  },
  async dead_letter_with_reason_and_description(client) {
    await client.createSender("js-dead-letter").sendMessages({ body: "poison" });
    const receiver = client.createReceiver("js-dead-letter");
    await receiver.deadLetterMessage(await receiveOne(receiver), {
      deadLetterReason: "bad-input",
      deadLetterErrorDescription: "field x is missing",
    });
    const dlq = client.createReceiver("js-dead-letter", { subQueueType: "deadLetter" });
    const letter = await receiveOne(dlq);
    assert.equal(letter.body, "poison");
    assert.equal(letter.deadLetterReason, "bad-input");
    assert.equal(letter.deadLetterErrorDescription, "field x is missing");
    await dlq.completeMessage(letter);
  },
  async schedule_and_cancel(client) {
    const sender = client.createSender("js-schedule");
    const numbers = await sender.scheduleMessages({ body: "later" }, new Date(Date.now() + 300000));
    assert.equal(numbers.length, 1);
    const receiver = client.createReceiver("js-schedule");
    assert.equal((await receiver.peekMessages(10)).length, 1, "peek shows the scheduled message");
    await sender.cancelScheduledMessages(numbers);
    assert.equal((await receiver.peekMessages(10)).length, 0, "nothing left after cancelling");
  },
  async renew_lock(client) {
    await client.createSender("js-renew").sendMessages({ body: "slow" });
    const receiver = client.createReceiver("js-renew");
    const message = await receiveOne(receiver);
    const first = message.lockedUntilUtc;
    const renewed = await receiver.renewMessageLock(message);
    assert.ok(renewed >= first, `renewed ${renewed} before ${first}`);
    await receiver.completeMessage(message);
  },
  async peek(client) {
    await client.createSender("js-peek").sendMessages([{ body: "p0" }, { body: "p1" }]);
    const receiver = client.createReceiver("js-peek");
    const peeked = await receiver.peekMessages(2);
    assert.deepEqual(peeked.map((m) => m.body), ["p0", "p1"]);
    const message = await receiveOne(receiver);
    assert.equal(message.body, "p0", "peeking did not take the message");
    await receiver.completeMessage(message);
  },
  async defer(client) {
    await client.createSender("js-defer").sendMessages({ body: "not now" });
    const receiver = client.createReceiver("js-defer");
    const message = await receiveOne(receiver);
    await receiver.deferMessage(message);
    await receiveNone(receiver);
    const [deferred] = await receiver.receiveDeferredMessages([message.sequenceNumber]);
    assert.equal(deferred.body, "not now");
    await receiver.completeMessage(deferred);
  },
  async receive_and_delete(client) {
    await client.createSender("js-receive-delete").sendMessages({ body: "once" });
    const receiver = client.createReceiver("js-receive-delete", { receiveMode: "receiveAndDelete" });
    assert.equal((await receiveOne(receiver)).body, "once");
    await receiveNone(client.createReceiver("js-receive-delete"));
  },
  async batch_send(client) {
    // An array is sent as one batched transfer.
    await client.createSender("js-batch").sendMessages([{ body: "b0" }, { body: "b1" }, { body: "b2" }]);
    const receiver = client.createReceiver("js-batch");
    const bodies = [];
    const deadline = Date.now() + WAIT;
    while (bodies.length < 3 && Date.now() < deadline) {
      for (const m of await receiver.receiveMessages(3, { maxWaitTimeInMs: WAIT })) {
        bodies.push(m.body);
        await receiver.completeMessage(m);
      }
    }
    assert.deepEqual(bodies, ["b0", "b1", "b2"]);
  },
  async topic_fan_out(client) {
    await client.createSender("js-fanout").sendMessages({ body: "to all" });
    for (const subscription of ["a", "b"]) {
      const receiver = client.createReceiver("js-fanout", subscription);
      const message = await receiveOne(receiver);
      assert.equal(message.body, "to all");
      await receiver.completeMessage(message);
    }
  },
};

async function main(argv) {
  if (argv[0] === "--entities") {
    console.log(ENTITIES.join("\n"));
    return 0;
  }
  const [connectionString, ...only] = argv;
  let passed = 0;
  let failed = 0;
  for (const [name, test] of Object.entries(tests)) {
    if (only.length && !only.includes(name)) continue;
    const client = new ServiceBusClient(connectionString, { retryOptions: { maxRetries: 0 } });
    const started = Date.now();
    let timer;
    try {
      await Promise.race([
        test(client),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error("timed out after 40 s")), 40000);
        }),
      ]);
      passed += 1;
      console.log(`PASS  ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
    } catch (error) {
      failed += 1;
      console.log(`FAIL  ${name}: ${error && error.stack ? error.stack : error}`);
    } finally {
      clearTimeout(timer);
      await client.close().catch(() => {});
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  return failed ? 1 : 0;
}

main(process.argv.slice(2)).then((code) => process.exit(code));
