// Package outbox is dealbridge's transactional outbox: messages written in
// the same Postgres transaction as the state change they announce, and a
// relay that moves them to the handler transport.
//
// The outbox table is watermill-sql's DefaultPostgreSQLSchema table for the
// topic Topic; each row is a watermill forwarder envelope naming its
// destination topic. Messages are visible to the relay only once their
// transaction has committed AND every older transaction has finished (xid8 +
// snapshot xmin), so a late commit is never skipped (invariant I2).
package outbox

import (
	"context"
	"fmt"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
)

// Topic is the outbox's watermill topic; migrations create its tables
// (watermill_outbox, watermill_offsets_outbox).
const Topic = "outbox"

// PublishTx writes msgs, addressed to destTopic, into the outbox through tx.
// They are relayed if and only if tx commits; if tx is rolled back they are
// gone with it. The caller commits or rolls back tx, and must check the
// error of Commit. When tx is a WriteMarker it is told, so that the relays
// can be woken after the commit (Notifier).
func PublishTx(ctx context.Context, tx pgx.Tx, destTopic string, msgs ...*message.Message) error {
	// A watermill-sql publisher is bound to one transaction handle, so it is
	// built per transaction; it is a small struct and costs nothing.
	pub, err := wsql.NewPublisher(wsql.TxFromPgx(tx), wsql.PublisherConfig{
		SchemaAdapter: wsql.DefaultPostgreSQLSchema{},
	}, watermill.NopLogger{})
	if err != nil {
		return fmt.Errorf("cannot create outbox publisher: %w", err)
	}
	if m, ok := tx.(WriteMarker); ok {
		m.MarkOutboxWrite()
	}
	fwd := forwarder.NewPublisher(pub, forwarder.PublisherConfig{ForwarderTopic: Topic})
	for _, m := range msgs {
		m.SetContext(ctx)
	}
	if err := fwd.Publish(destTopic, msgs...); err != nil {
		return fmt.Errorf("cannot write %d message(s) for %s to the outbox: %w", len(msgs), destTopic, err)
	}
	return nil
}

// QueuePublishTx is PublishTx that queues the outbox insert in b instead of
// running it: the caller sends b through tx (as one round trip with other
// statements of the transaction) and must check the batch's error, which
// fails the transaction. The envelope and the statement are the ones
// PublishTx would write: the forwarder's and watermill-sql's own
// (DefaultPostgreSQLSchema.InsertQuery). tx is marked as for PublishTx.
func QueuePublishTx(b *pgx.Batch, tx pgx.Tx, destTopic string, msgs ...*message.Message) error {
	if m, ok := tx.(WriteMarker); ok {
		m.MarkOutboxWrite()
	}
	fwd := forwarder.NewPublisher(batchPublisher{b: b}, forwarder.PublisherConfig{ForwarderTopic: Topic})
	if err := fwd.Publish(destTopic, msgs...); err != nil {
		return fmt.Errorf("cannot write %d message(s) for %s to the outbox: %w", len(msgs), destTopic, err)
	}
	return nil
}

// batchPublisher is a message.Publisher that queues watermill-sql's insert
// statement in a pgx batch.
type batchPublisher struct{ b *pgx.Batch }

func (p batchPublisher) Publish(topic string, msgs ...*message.Message) error {
	q, err := wsql.DefaultPostgreSQLSchema{}.InsertQuery(wsql.InsertQueryParams{Topic: topic, Msgs: msgs})
	if err != nil {
		return err
	}
	p.b.Queue(q.Query, q.Args...)
	return nil
}

func (batchPublisher) Close() error { return nil }

// InvoiceTopic is the destination topic of invoice requests: the invoice
// saga's work queue.
const InvoiceTopic = "invoice-requests"

// AlertTopic is the destination topic of alert notifications: the alert
// webhook's work queue.
const AlertTopic = "alert-notifications"

// Message metadata keys and values written by producers of outbox messages.
const (
	MetadataType           = "type"
	MetadataSchemaVersion  = "schema_version"
	MetadataIdempotencyKey = "idempotency_key"
	MetadataCorrelationID  = "correlation_id"
	MetadataReinjectedFrom = "reinjected_from"

	TypeInvoiceRequest    = "InvoiceRequest"
	TypeAlertNotification = "AlertNotification"
)
