// Package postgres holds dealbridge's Postgres adapters: the event log and
// the store that runs each command as one unit of work — state change,
// events, projections and outbox messages in ONE pgx transaction.
package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dealbridge/dealbridge/domain"
)

// AppendTx appends change's events to the log through tx, numbering them
// from change.ExpectedVersion+1. If another writer appended to the stream
// first, the unique (stream_id, stream_version) constraint fails and AppendTx
// returns a *domain.ConflictError (errors.Is domain.ErrVersionConflict); the
// caller must roll back. recorded_at is the transaction's now(), so all
// events of one unit of work share one timestamp.
func AppendTx(ctx context.Context, tx pgx.Tx, change domain.Change, meta domain.Metadata) ([]domain.RecordedEvent, error) {
	return AppendAllTx(ctx, tx, meta, change)
}

// insertEventSQL appends one event. The events_chain trigger (migration
// 00007) links it to its predecessor in the stream: prev_hash and hash.
// Computing them in the database covers every writer; `audit verify`
// recomputes the chain independently (chain.go).
const insertEventSQL = `INSERT INTO events (stream_id, stream_version, type, schema_version, payload, metadata)
	VALUES ($1,$2,$3,$4,$5,$6) RETURNING position, recorded_at, payload`

// AppendAllTx is AppendTx for several changes, in order, with every insert
// pipelined in one round trip: on this kind of machine a round trip costs
// more than the insert. The statements still run one after the other, so an
// event's trigger finds the predecessor appended just before it in the same
// batch. The first failure stops the batch (the transaction is then
// aborted: the caller must roll back).
func AppendAllTx(ctx context.Context, tx pgx.Tx, meta domain.Metadata, changes ...domain.Change) ([]domain.RecordedEvent, error) {
	mb, err := json.Marshal(meta)
	if err != nil {
		return nil, fmt.Errorf("cannot encode event metadata: %w", err)
	}
	n := 0
	for _, c := range changes {
		n += len(c.Events)
	}
	if n == 0 {
		return nil, nil
	}
	type appended struct {
		pos    int64
		at     time.Time
		stored []byte
	}
	got := make([]appended, n) // sized once: the callbacks keep pointers into it
	var b pgx.Batch
	k := 0
	for _, c := range changes {
		for i, e := range c.Events {
			pb, err := json.Marshal(e)
			if err != nil {
				return nil, fmt.Errorf("cannot encode %s: %w", e.EventType(), err)
			}
			c, e, v, a := c, e, c.ExpectedVersion+i+1, &got[k]
			b.Queue(insertEventSQL, c.StreamID, v, e.EventType(), domain.CurrentSchemaVersion(e.EventType()), pb, mb).
				QueryRow(func(row pgx.Row) error {
					err := row.Scan(&a.pos, &a.at, &a.stored)
					var pgErr *pgconn.PgError
					switch {
					case err == nil:
						return nil
					case errors.As(err, &pgErr) && pgErr.Code == "23505":
						return &domain.ConflictError{Stream: c.StreamID, Expected: c.ExpectedVersion, Actual: -1}
					default:
						return fmt.Errorf("cannot append %s to %s: %w", e.EventType(), c.StreamID, err)
					}
				})
			k++
		}
	}
	if err := tx.SendBatch(ctx, &b).Close(); err != nil {
		return nil, err
	}
	out := make([]domain.RecordedEvent, 0, n)
	k = 0
	for _, c := range changes {
		for i, e := range c.Events {
			a, v, sv := got[k], c.ExpectedVersion+i+1, domain.CurrentSchemaVersion(e.EventType())
			k++
			// Project the event as the log holds it, not as it was handed
			// in: jsonb normalises what it stores (key order, spacing of raw
			// JSON fields such as a dead letter's payload), and a replay
			// sees only the stored form. Projecting the same value live is
			// what makes replay equal live (invariant I6).
			back, err := domain.DecodeEvent(e.EventType(), sv, a.stored)
			if err != nil {
				return nil, fmt.Errorf("cannot read back %s appended to %s: %w", e.EventType(), c.StreamID, err)
			}
			out = append(out, domain.RecordedEvent{
				Position: a.pos, StreamID: c.StreamID, StreamVersion: v, SchemaVersion: sv,
				Event: back, Metadata: meta, RecordedAt: a.at,
			})
		}
	}
	return out, nil
}

// Querier is what reading functions need: a pool, a conn or a tx.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// LoadStream returns a stream's events in order.
func LoadStream(ctx context.Context, q Querier, streamID string) ([]domain.RecordedEvent, error) {
	rows, err := q.Query(ctx, `SELECT position, stream_id, stream_version, type, schema_version, payload, metadata, recorded_at
		FROM events WHERE stream_id=$1 ORDER BY stream_version`, streamID)
	if err != nil {
		return nil, fmt.Errorf("cannot load stream %s: %w", streamID, err)
	}
	return scanEvents(rows)
}

func scanEvents(rows pgx.Rows) ([]domain.RecordedEvent, error) {
	defer rows.Close()
	var out []domain.RecordedEvent
	for rows.Next() {
		var (
			r         domain.RecordedEvent
			typ       string
			payload   []byte
			metaBytes []byte
		)
		if err := rows.Scan(&r.Position, &r.StreamID, &r.StreamVersion, &typ, &r.SchemaVersion, &payload, &metaBytes, &r.RecordedAt); err != nil {
			return nil, fmt.Errorf("cannot read event: %w", err)
		}
		e, err := domain.DecodeEvent(typ, r.SchemaVersion, payload)
		if err != nil {
			return nil, fmt.Errorf("event %d: %w", r.Position, err)
		}
		r.Event = e
		if err := json.Unmarshal(metaBytes, &r.Metadata); err != nil {
			return nil, fmt.Errorf("event %d metadata: %w", r.Position, err)
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("cannot read events: %w", err)
	}
	return out, nil
}
