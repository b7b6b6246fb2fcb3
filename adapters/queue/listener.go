package queue

import (
	"context"

	"github.com/dealbridge/dealbridge/adapters/pgnotify"
)

// listen holds a dedicated LISTEN connection until ctx is done and wakes
// the consumers of the notified topic on every NOTIFY. When the connection
// fails it reconnects after Config.ReconnectDelay and wakes every topic
// (notifications sent meanwhile are lost; polling covers that gap too).
func (s *Subscriber) listen(ctx context.Context) {
	l := pgnotify.Listener{
		Conn:    s.pool.Config().ConnConfig,
		Channel: NotifyChannel,
		OnNotify: func(topic string) {
			s.mu.Lock()
			w := s.wakers[topic]
			s.mu.Unlock()
			if w != nil {
				w.wake()
			}
		},
		OnConnect:      s.wakeAll, // anything published while we were not listening
		ReconnectDelay: s.cfg.ReconnectDelay,
		Logger:         s.log.With("component", "queue"),
	}
	l.Run(ctx)
}

func (s *Subscriber) wakeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range s.wakers {
		w.wake()
	}
}
