package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/queue"
)

// naiveRelay is the positive control: the relay everybody writes first. It
// polls the outbox for rows with "offset" > the last one it saw, in offset
// order, and publishes them into the work queue. Sequence values are taken
// at INSERT and become visible at COMMIT, so a row whose transaction
// commits after a younger row's has been seen is skipped for good
// (reliability.md, pitfall 1; F17). The checker must see that loss.
type naiveRelay struct {
	url     string
	lastID  atomic.Int64
	cancel  context.CancelFunc
	done    chan struct{}
	once    sync.Once
	relayed atomic.Int64
}

func newNaiveRelay(url string) *naiveRelay {
	return &naiveRelay{url: url, done: make(chan struct{})}
}

// envelope is watermill's forwarder envelope, as the outbox stores it.
type envelope struct {
	DestinationTopic string            `json:"destination_topic"`
	UUID             string            `json:"uuid"`
	Payload          []byte            `json:"payload"`
	Metadata         map[string]string `json:"metadata"`
}

func unwrap(b []byte) (string, *message.Message, error) {
	var e envelope
	if err := json.Unmarshal(b, &e); err != nil {
		return "", nil, err
	}
	m := message.NewMessage(e.UUID, e.Payload)
	m.Metadata = e.Metadata
	return e.DestinationTopic, m, nil
}

// start runs the relay until stop.
func (n *naiveRelay) start(ctx context.Context) {
	ctx, n.cancel = context.WithCancel(ctx)
	go n.run(ctx)
}

func (n *naiveRelay) run(ctx context.Context) {
	defer close(n.done)
	cfg, err := pgxpool.ParseConfig(n.url)
	if err != nil {
		return
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = "chaos-naive-relay"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return
	}
	defer pool.Close()
	pub, err := queue.NewPublisher(pool, queue.PublisherConfig{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		return
	}
	for ctx.Err() == nil {
		if moved, err := n.step(ctx, pool, pub); err != nil || moved == 0 {
			sleep(ctx, 50*time.Millisecond)
		}
	}
}

func (n *naiveRelay) step(ctx context.Context, pool *pgxpool.Pool, pub message.Publisher) (int, error) {
	rows, err := pool.Query(ctx, `SELECT "offset", payload::text FROM watermill_outbox WHERE "offset" > $1 ORDER BY "offset" LIMIT 100`, n.lastID.Load())
	if err != nil {
		return 0, err
	}
	type row struct {
		id      int64
		payload string
	}
	var batch []row
	for rows.Next() {
		var x row
		if err := rows.Scan(&x.id, &x.payload); err != nil {
			rows.Close()
			return 0, err
		}
		batch = append(batch, x)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return 0, err
	}
	for _, x := range batch {
		topic, m, err := unwrap([]byte(x.payload))
		if err != nil {
			return 0, fmt.Errorf("outbox row %d: %w", x.id, err)
		}
		if err := pub.Publish(topic, m); err != nil {
			return 0, err
		}
		n.lastID.Store(x.id)
		n.relayed.Add(1)
	}
	return len(batch), nil
}

func (n *naiveRelay) stop() {
	n.once.Do(func() {
		if n.cancel != nil {
			n.cancel()
		}
	})
	select {
	case <-n.done:
	case <-time.After(10 * time.Second):
	}
}
