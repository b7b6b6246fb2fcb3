// Package queue is dealbridge's Postgres work queue: the handler transport
// that carries saga work from the relay to the handler processes, behind
// Watermill's message.Publisher and message.Subscriber interfaces.
//
// Messages live in the work_queue table (migrations/00003_work_queue.sql),
// one row per message. A [Publisher] inserts rows, inside the caller's
// transaction when the message context carries one (see [ContextWithTx]), and
// sends a NOTIFY in the same transaction as a wake-up. A [Subscriber] runs
// several consumer goroutines per subscription; each one claims a row with
// FOR UPDATE SKIP LOCKED in a single-statement transaction that takes a lease
// (on the database clock) and a fresh claim token and commits before the
// message is handed out. No transaction is open while the handler runs
// (invariant I5).
//
// # Delivery guarantees
//
//   - At least once. A message is deleted only by an Ack; a crash, a lost
//     lease or a failed Ack query means it is delivered again, with the
//     attempt number ([MetadataAttempt]) incremented. Handlers must be
//     idempotent.
//   - Ack: the row is deleted if this delivery still holds the lease (the
//     claim token matches). Nack: the lease is cleared and the row becomes
//     available again after the per-message delay ([SetNackDelay]) or
//     [SubscriberConfig.NackDelay]. A consumer whose lease was taken over by
//     another consumer cannot ack, nack or extend the message (fencing); the
//     attempt is logged and ignored.
//   - While a message is out, its lease is extended every Lease/3. When an
//     extension finds the lease gone, the message context is cancelled with
//     cause [ErrLeaseLost] so that the handler stops.
//   - Ordering: messages with the same [MetadataOrderingKey] on a topic are
//     delivered one at a time, in publish order (for publishes that
//     committed one after another; the publisher serialises concurrent
//     publishers of one key). Only the oldest message of a key can be
//     claimed, so a nacked or leased message blocks the rest of its key.
//     Messages without a key, and messages of different keys, are delivered
//     in parallel and in no guaranteed order.
//   - There are no consumer groups: every message goes to one consumer,
//     whichever subscriber claims it first.
//   - Wake-up: publishers NOTIFY [NotifyChannel] with the topic; each
//     Subscriber holds one LISTEN connection (reconnected when it dies) and
//     wakes one idle consumer per notification, which wakes the next when
//     it found work. NOTIFY is not durable, so idle consumers also poll
//     every PollInterval; a lost notification costs latency, never a
//     message.
//   - Shutdown: Close (or cancelling the Subscribe context) releases
//     claimed messages not yet handed out at once, cancels the contexts of
//     messages held by handlers and waits up to CloseTimeout for their Ack
//     or Nack; a message still held after that is left to lease expiry
//     rather than nacked, so that a handler that ignores its context never
//     runs concurrently with a redelivery before its lease runs out.
//
// A claim scans the topic in id order, so messages queued behind a blocked
// ordering key cost a little on every claim; the queue is meant for a
// modest backlog per key (a few messages per deal), not millions.
//
// # Watermill test suite
//
// The package passes tests.TestPubSub with Features{Persistent: true}:
// messages outlive any publisher or subscriber. Not claimed:
// GuaranteedOrder (several consumers run unkeyed messages in parallel),
// ExactlyOnceDelivery (delivery is at least once), ConsumerGroups and
// NewSubscriberReceivesOldMessages (a queue, not a log: acked messages are
// deleted and each message goes to one consumer), ContextPreserved (the
// publisher's context does not cross the database).
package queue
