package queue

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
)

// Metadata keys understood or set by the queue.
const (
	// MetadataOrderingKey, set by the publisher's caller (for example to
	// the deal id), makes the message part of a strictly ordered,
	// one-at-a-time sequence on its topic. Empty means no ordering.
	MetadataOrderingKey = "queue_ordering_key"

	// MetadataNackDelay is how long a nacked message waits before it can
	// be delivered again, as a Go duration string. Set it with
	// [SetNackDelay] before returning an error from a handler. It is
	// removed from every delivered message, so it only ever applies to
	// the delivery it was set on.
	MetadataNackDelay = "queue_nack_delay"

	// MetadataNackReason is recorded in the row's last_error on Nack.
	// Set it with [SetNackReason]. Removed from delivered messages.
	MetadataNackReason = "queue_nack_reason"

	// MetadataAttempt is set by the subscriber on every delivered message:
	// the 1-based delivery attempt, counted in the row at claim time, so
	// that a crash of the consumer loses no attempt.
	MetadataAttempt = "queue_attempt"

	// MetadataEnqueuedAt is set by the subscriber on every delivered
	// message: when the message was first enqueued (RFC 3339, UTC).
	MetadataEnqueuedAt = "queue_enqueued_at"
)

// NotifyChannel is the LISTEN/NOTIFY channel the publisher notifies (with
// the topic as payload) and the subscriber listens on.
const NotifyChannel = "work_queue"

// ErrLeaseLost is the cause of a delivered message's context cancellation
// when its lease could not be extended because another consumer now holds
// the message (or the lease ran out while the database was unreachable).
var ErrLeaseLost = errors.New("queue: lease lost")

// ErrHandlerTimeout is the cause of a delivered message's context
// cancellation when its handler has held it for
// SubscriberConfig.HandlerTimeout without an Ack or Nack.
var ErrHandlerTimeout = errors.New("queue: handler timeout")

// SetOrderingKey sets msg's ordering key (see [MetadataOrderingKey]).
func SetOrderingKey(msg *message.Message, key string) {
	msg.Metadata.Set(MetadataOrderingKey, key)
}

// SetNackDelay asks the subscriber to make msg available again only after d
// when it is nacked (for example by a handler returning an error).
// d <= 0 means immediately.
func SetNackDelay(msg *message.Message, d time.Duration) {
	msg.Metadata.Set(MetadataNackDelay, d.String())
}

// SetNackReason records why msg is about to be nacked; the subscriber
// stores it in the row's last_error column.
func SetNackReason(msg *message.Message, reason string) {
	msg.Metadata.Set(MetadataNackReason, reason)
}

// Attempt returns the delivery attempt of a message delivered by the
// [Subscriber] (1 for the first delivery), or 0 if msg carries none.
func Attempt(msg *message.Message) int {
	n, err := strconv.Atoi(msg.Metadata.Get(MetadataAttempt))
	if err != nil {
		return 0
	}
	return n
}

// EnqueuedAt returns when a message delivered by the [Subscriber] was first
// enqueued, and false if msg carries no such time.
func EnqueuedAt(msg *message.Message) (time.Time, bool) {
	t, err := time.Parse(time.RFC3339Nano, msg.Metadata.Get(MetadataEnqueuedAt))
	if err != nil {
		return time.Time{}, false
	}
	return t, true
}

// nackDelay returns the delay requested through msg's metadata.
func nackDelay(msg *message.Message) (time.Duration, bool, error) {
	v := msg.Metadata.Get(MetadataNackDelay)
	if v == "" {
		return 0, false, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, false, fmt.Errorf("invalid %s %q: %w", MetadataNackDelay, v, err)
	}
	return max(d, 0), true, nil
}

type txKey struct{}

// ContextWithTx returns a context that makes [Publisher.Publish] insert
// messages carrying it (via msg.SetContext) inside tx, so the messages are
// enqueued if and only if tx commits. The caller commits or rolls back tx.
func ContextWithTx(ctx context.Context, tx pgx.Tx) context.Context {
	return context.WithValue(ctx, txKey{}, tx)
}

// txFromContext returns the transaction placed by [ContextWithTx].
func txFromContext(ctx context.Context) (pgx.Tx, bool) {
	tx, ok := ctx.Value(txKey{}).(pgx.Tx)
	return tx, ok && tx != nil
}
