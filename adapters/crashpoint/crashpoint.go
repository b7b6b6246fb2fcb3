// Package crashpoint lets fault-injection runs kill a process at a named
// point of its code, the way a power cut or an OOM kill would: with SIGKILL,
// no deferred function, no flush, no graceful shutdown.
//
// A process is armed through the environment variable DEALBRIDGE_CRASHPOINT,
// a comma-separated list of NAME or NAME@N (crash at the N-th time NAME is
// hit; default the first). Unarmed, Hit costs one atomic load. The points
// are:
//
//	after_erp_2xx_before_commit            saga: the ERP answered with an invoice, nothing recorded yet
//	after_commit_before_ack                saga: invoice recorded, work-queue message not acked yet
//	relay_after_publish_before_offset_ack  relay: a message published into the work queue (its insert held
//	                                       in the relay's open transaction), the offset not committed
//
// Before it kills the process, Hit writes one line "crashpoint NAME hit N:
// SIGKILL" to stderr, so that a harness can count the crashes it caused.
package crashpoint

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/ThreeDotsLabs/watermill/message"
)

// EnvVar arms crash points.
const EnvVar = "DEALBRIDGE_CRASHPOINT"

// The crash points called by dealbridge's code.
const (
	AfterERP2xxBeforeCommit          = "after_erp_2xx_before_commit"
	AfterCommitBeforeAck             = "after_commit_before_ack"
	RelayAfterPublishBeforeOffsetAck = "relay_after_publish_before_offset_ack"
)

type point struct {
	at   int64
	hits atomic.Int64
}

var (
	once   sync.Once
	points map[string]*point
	armed  atomic.Bool
)

func load() {
	points = map[string]*point{}
	for name, at := range Parse(os.Getenv(EnvVar)) {
		points[name] = &point{at: at}
	}
	armed.Store(len(points) > 0)
}

// Parse reads an EnvVar value into crash point → the hit that fires it;
// malformed entries are ignored.
func Parse(v string) map[string]int64 {
	out := map[string]int64{}
	for _, f := range strings.Split(v, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		name, n, ok := strings.Cut(f, "@")
		at := int64(1)
		if ok {
			x, err := strconv.ParseInt(n, 10, 64)
			if err != nil || x < 1 {
				continue
			}
			at = x
		}
		out[name] = at
	}
	return out
}

// Hit SIGKILLs the calling process when name is armed and this is its
// N-th hit.
func Hit(name string) {
	once.Do(load)
	if !armed.Load() {
		return
	}
	p := points[name]
	if p == nil {
		return
	}
	if n := p.hits.Add(1); n == p.at {
		fmt.Fprintf(os.Stderr, "crashpoint %s hit %d: SIGKILL\n", name, n)
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // never return into the code after the point
	}
}

// Middleware hits name after the wrapped handler returned successfully and
// before the router acks the message (for the relay: after the publish into
// the work queue, before the offset commits).
func Middleware(name string) message.HandlerMiddleware {
	return func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			out, err := h(msg)
			if err == nil {
				Hit(name)
			}
			return out, err
		}
	}
}
