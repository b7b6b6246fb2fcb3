package queue

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// listen holds a dedicated LISTEN connection until ctx is done and wakes
// the consumers of the notified topic on every NOTIFY. When the connection
// fails it reconnects after Config.ReconnectDelay and wakes every topic
// (notifications sent meanwhile are lost; polling covers that gap too).
func (s *Subscriber) listen(ctx context.Context) {
	for ctx.Err() == nil {
		err := s.listenOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		s.log.WarnContext(ctx, "queue: LISTEN connection lost; polling until it is back", "err", err)
		t := time.NewTimer(s.cfg.ReconnectDelay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}
}

func (s *Subscriber) listenOnce(ctx context.Context) (err error) {
	conn, err := pgx.ConnectConfig(ctx, s.pool.Config().ConnConfig.Copy())
	if err != nil {
		return fmt.Errorf("cannot connect: %w", err)
	}
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_ = conn.Close(closeCtx)
	}()
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{NotifyChannel}.Sanitize()); err != nil {
		return fmt.Errorf("cannot listen: %w", err)
	}
	s.log.DebugContext(ctx, "queue: listening", "channel", NotifyChannel)
	s.wakeAll() // anything published while we were not listening
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return fmt.Errorf("wait for notification: %w", err)
		}
		s.mu.Lock()
		w := s.wakers[n.Payload]
		s.mu.Unlock()
		if w != nil {
			w.wake()
		}
	}
}

func (s *Subscriber) wakeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range s.wakers {
		w.wake()
	}
}
