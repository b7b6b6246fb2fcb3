package queue_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/dealbridge/dealbridge/adapters/queue"
)

// BenchmarkQueueThroughput publishes b.N messages (100 per Publish call),
// then consumes them all with a no-op handler that acks at once. It reports
// the consume rate as msgs/s and the publish rate as pub-msgs/s.
func BenchmarkQueueThroughput(b *testing.B) {
	dbURL := newDatabase(b)
	for _, consumers := range []int{1, 4, 16} {
		b.Run(fmt.Sprintf("consumers=%d", consumers), func(b *testing.B) {
			pool := newPool(b, dbURL, "wq-bench", int32(consumers)+4)
			pub := newPublisher(b, pool)
			topic := fmt.Sprintf("bench-%d-%d", consumers, b.N)

			b.StopTimer()
			start := time.Now()
			for i := 0; i < b.N; i += 100 {
				batch := make([]*message.Message, 0, 100)
				for j := i; j < min(i+100, b.N); j++ {
					batch = append(batch, newMsg("x"))
				}
				publish(b, pub, topic, batch...)
			}
			pubRate := float64(b.N) / time.Since(start).Seconds()

			sub := newSubscriber(b, pool, queue.SubscriberConfig{Consumers: consumers})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			b.StartTimer()
			start = time.Now()
			msgs, err := sub.Subscribe(ctx, topic)
			if err != nil {
				b.Fatal(err)
			}
			for range b.N {
				receive(b, msgs, time.Minute).Ack()
			}
			// Wait for the last acks to reach the database.
			eventually(b, time.Minute, "queue drained", func() bool {
				var n int
				if err := pool.QueryRow(ctx, `SELECT count(*) FROM work_queue WHERE topic = $1`, topic).Scan(&n); err != nil {
					b.Fatal(err)
				}
				return n == 0
			})
			b.StopTimer()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
			b.ReportMetric(pubRate, "pub-msgs/s")
			cancel()
			if err := sub.Close(); err != nil {
				b.Fatal(err)
			}
		})
	}
}
