// Package pgnotify keeps a Postgres LISTEN connection open and turns
// notifications into wake-ups. NOTIFY is not durable: a notification sent
// while no connection listens is lost, so every user of this package also
// polls, and treats a (re)connect as a wake-up.
package pgnotify

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
)

// Listener listens on one channel.
type Listener struct {
	// Conn configures the dedicated connection (it is never a pooled one:
	// LISTEN is session state).
	Conn *pgx.ConnConfig
	// Channel is the notification channel.
	Channel string
	// OnNotify is called with each notification's payload.
	OnNotify func(payload string)
	// OnConnect is called each time the connection is (re)established:
	// notifications sent meanwhile are lost, so the caller looks anyway.
	OnConnect func()
	// ReconnectDelay is the pause before reconnecting. Default 1s.
	ReconnectDelay time.Duration
	Logger         *slog.Logger
}

// Run listens until ctx is done, reconnecting after failures.
func (l *Listener) Run(ctx context.Context) {
	delay := l.ReconnectDelay
	if delay <= 0 {
		delay = time.Second
	}
	for ctx.Err() == nil {
		err := l.once(ctx)
		if ctx.Err() != nil {
			return
		}
		if l.Logger != nil {
			l.Logger.WarnContext(ctx, "LISTEN connection lost; polling until it is back", "channel", l.Channel, "err", err)
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}
}

func (l *Listener) once(ctx context.Context) error {
	conn, err := pgx.ConnectConfig(ctx, l.Conn.Copy())
	if err != nil {
		return fmt.Errorf("cannot connect: %w", err)
	}
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_ = conn.Close(closeCtx)
	}()
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{l.Channel}.Sanitize()); err != nil {
		return fmt.Errorf("cannot listen on %s: %w", l.Channel, err)
	}
	if l.Logger != nil {
		l.Logger.DebugContext(ctx, "listening", "channel", l.Channel)
	}
	if l.OnConnect != nil {
		l.OnConnect()
	}
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return fmt.Errorf("wait for notification: %w", err)
		}
		if l.OnNotify != nil {
			l.OnNotify(n.Payload)
		}
	}
}
