package outbox

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// WriteMarker is implemented by a transaction wrapper that wants to know
// whether PublishTx wrote outbox rows through it, so that its owner can
// wake the relays once the transaction has committed (see Notifier).
type WriteMarker interface {
	MarkOutboxWrite()
}

// Notifier wakes relays after commits that wrote outbox rows, with a NOTIFY
// on NotifyChannel sent in a statement of its own.
//
// Why not a trigger on the outbox table: Postgres serialises the commits of
// all transactions that sent a NOTIFY (a cluster-wide lock held until the
// commit record is flushed), so a NOTIFY inside every close transaction
// turns group commit off for the busiest write path. A NOTIFY sent alone
// writes no WAL and holds that lock for microseconds.
//
// Notifications coalesce: while one is being sent, further calls only ask
// for one more, sent after it — so a relay woken by any notification sent
// after a commit sees that commit's rows. A lost notification (the LISTEN
// connection was down, the process died between commit and notify) only
// delays rows to the relay's next poll.
type Notifier struct {
	pool *pgxpool.Pool
	log  *slog.Logger

	mu      sync.Mutex
	sending bool
	again   bool
}

// notifySQL wakes the relays; sent outside any transaction it writes no WAL.
const notifySQL = `SELECT pg_notify('` + NotifyChannel + `', '')`

// AfterCommit is for a writer that can run a statement right after its own
// commit in the same round trip (a pipelined COMMIT; statement): it returns
// the statement that wakes the relays. Each such commit sends its own: one
// coalesced with a notification already being sent could reach a relay
// before this commit's rows are visible, and they would wait for its next
// poll.
func (n *Notifier) AfterCommit() string { return notifySQL }

// AfterCommitFailed reports that the statement AfterCommit returned failed:
// the relays will find the rows at their next poll.
func (n *Notifier) AfterCommitFailed(ctx context.Context, err error) {
	n.log.WarnContext(ctx, "outbox: cannot wake the relays; they will poll", "err", err)
}

// NewNotifier returns a Notifier sending through pool.
func NewNotifier(pool *pgxpool.Pool, logger *slog.Logger) *Notifier {
	if logger == nil {
		logger = slog.Default()
	}
	return &Notifier{pool: pool, log: logger}
}

// Notify wakes the relays; call it after a commit that wrote outbox rows.
// It returns at once when another call is sending (that call sends once
// more on this one's behalf), else after the NOTIFY. Failures are logged,
// never returned: the commit has happened, and polling covers a lost wake-up.
func (n *Notifier) Notify(ctx context.Context) {
	n.mu.Lock()
	if n.sending {
		n.again = true
		n.mu.Unlock()
		return
	}
	n.sending = true
	n.mu.Unlock()
	for {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		_, err := n.pool.Exec(sctx, notifySQL, pgx.QueryExecModeSimpleProtocol)
		cancel()
		if err != nil {
			n.log.WarnContext(ctx, "outbox: cannot wake the relays; they will poll", "err", err)
		}
		n.mu.Lock()
		if !n.again {
			n.sending = false
			n.mu.Unlock()
			return
		}
		n.again = false
		n.mu.Unlock()
	}
}
