package postgres

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"time"

	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// DeadLetterTopic is the topic name the poison-queue middleware publishes
// to; DeadLetterPublisher ignores it and writes the dead_letters table.
const DeadLetterTopic = "dead-letters"

// DeadLetterPublisher is the message.Publisher behind Watermill's
// PoisonQueue middleware: each poisoned message becomes a dead letter plus
// an alert, in one transaction — the watermill-sql transaction of the
// message's context when there is one (inside the relay, so that the dead
// letter commits with the relay's offset), else one of its own.
type DeadLetterPublisher struct {
	store *Store
}

// NewDeadLetterPublisher returns a publisher that dead-letters through store.
func NewDeadLetterPublisher(store *Store) *DeadLetterPublisher {
	return &DeadLetterPublisher{store: store}
}

// Publish dead-letters msgs. The reason and origin come from the
// poison-queue metadata (reason_poisoned, topic_poisoned, handler_poisoned).
//
// It is idempotent per message UUID: a message dead-lettered before (a
// redelivery after a crash between the dead letter's commit and the ack)
// is not dead-lettered again — no second dead letter, alert or
// MessageDeadLettered event — and Publish reports success, so that the
// message is acknowledged.
func (p *DeadLetterPublisher) Publish(_ string, msgs ...*message.Message) error {
	for _, m := range msgs {
		if err := p.publish(m); err != nil {
			return err
		}
	}
	return nil
}

func (p *DeadLetterPublisher) publish(m *message.Message) error {
	ctx := m.Context()
	if wtx, ok := wsql.TxFromContext(ctx); ok {
		// Writes a queue.DeferringTx holds go first, as they were made first.
		ptx, ok, err := queue.PgxTxOf(ctx, wtx)
		if err != nil {
			return err
		}
		if ok {
			return p.deadLetterTx(ctx, ptx, m)
		}
	}
	return p.store.unit(ctx, func(tx pgx.Tx) error { return p.deadLetterTx(ctx, tx, m) })
}

// deadLetterTx claims m's UUID in poison_dead_letters and, when the claim
// is new, dead-letters m through tx. A concurrent claim of the same UUID
// waits for the first transaction: after its commit it finds the claim and
// skips, after its rollback it proceeds.
func (p *DeadLetterPublisher) deadLetterTx(ctx context.Context, tx pgx.Tx, m *message.Message) error {
	tag, err := tx.Exec(ctx, `INSERT INTO poison_dead_letters (message_uuid) VALUES ($1) ON CONFLICT (message_uuid) DO NOTHING`, m.UUID)
	if err != nil {
		return fmt.Errorf("cannot claim poison message %s for dead-lettering: %w", m.UUID, err)
	}
	if tag.RowsAffected() == 0 {
		return nil // dead-lettered before
	}
	now := time.Now().UTC()
	md := maps.Clone(map[string]string(m.Metadata))
	src := DeadLetterSource{
		MessageUUID: m.UUID, Topic: m.Metadata.Get(middleware.PoisonedTopicKey),
		Handler: m.Metadata.Get(middleware.PoisonedHandlerKey), Payload: m.Payload, Metadata: md,
	}
	f := Failure{ErrorClass: domain.ClassPoison, Reason: m.Metadata.Get(middleware.ReasonForPoisonedKey), Attempts: 1,
		FirstFailureAt: now, LastFailureAt: now}
	dealID, key := identify(m)
	meta := domain.Metadata{CorrelationID: m.Metadata.Get(outbox.MetadataCorrelationID), CausationID: m.UUID, Actor: "poison-queue"}
	res, err := p.store.DeadLetterTx(ctx, tx, dealID, key, f, src, meta)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `UPDATE poison_dead_letters SET dead_letter_id=$2 WHERE message_uuid=$1`, m.UUID, res.DeadLetterID); err != nil {
		return fmt.Errorf("cannot record the dead letter of poison message %s: %w", m.UUID, err)
	}
	return nil
}

// identify extracts the deal id and key from a message when it can.
func identify(m *message.Message) (dealID, key string) {
	key = m.Metadata.Get(outbox.MetadataIdempotencyKey)
	var probe struct {
		DealID string `json:"deal_id"`
	}
	if json.Unmarshal(m.Payload, &probe) == nil && validUUID(probe.DealID) {
		dealID = probe.DealID
	}
	return dealID, key
}

// Close does nothing.
func (p *DeadLetterPublisher) Close() error { return nil }
