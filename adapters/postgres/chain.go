package postgres

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// The tamper-evident hash chain of the event log (migration 00007).
//
// Each event stores prev_hash — the hash of the previous event of its
// stream, or 32 zero bytes for version 1 — and
//
//	hash = sha256(prev_hash ‖ lp(stream_id) ‖ be32(stream_version) ‖ lp(type) ‖ be32(schema_version)
//	              ‖ lp(payload as jsonb text) ‖ lp(metadata as jsonb text) ‖ be64(recorded_at µs since 1970))
//
// with lp(s) = be32(len(s)) ‖ s. The database computes it on insert
// (trigger events_chain); VerifyChain recomputes it here, in Go, so that a
// tampered trigger function does not vouch for itself.
//
// What the chain proves: an edited event fails its own hash; an event
// inserted into or deleted from the middle of a stream leaves a version gap
// or breaks the link to its successor. What it cannot prove on its own: the
// removal of a stream's LAST events, or a rewrite of a whole stream tail
// with recomputed hashes by someone who can also run the trigger. Against
// those, keep the head digest that VerifyChain reports somewhere else and
// compare (and `replay --verify` notices a projection that is ahead of the
// log).

// ChainProblem names one bad event (the first one of its stream).
type ChainProblem struct {
	StreamID      string `json:"stream_id"`
	StreamVersion int    `json:"stream_version"`
	Position      int64  `json:"position,omitempty"`
	Type          string `json:"type,omitempty"`
	Kind          string `json:"kind"` // edited, chain_broken, version_gap, bad_start
	Detail        string `json:"detail"`
}

func (p ChainProblem) String() string {
	where := fmt.Sprintf("%s version %d", p.StreamID, p.StreamVersion)
	if p.Position != 0 {
		where += fmt.Sprintf(" (position %d, %s)", p.Position, p.Type)
	}
	return fmt.Sprintf("%s: %s: %s", where, p.Kind, p.Detail)
}

// ChainReport is the outcome of VerifyChain.
type ChainReport struct {
	Events   int64          `json:"events"`
	Streams  int64          `json:"streams"`
	Problems []ChainProblem `json:"problems"`
	// HeadDigest is sha256 over every stream's (id, last version, last
	// hash) in stream order: record it elsewhere to detect later rewrites
	// of stream tails.
	HeadDigest string        `json:"head_digest"`
	Elapsed    time.Duration `json:"elapsed_ns"`
}

// OK reports whether the chain is intact.
func (r ChainReport) OK() bool { return len(r.Problems) == 0 }

var zeroHash = make([]byte, sha256.Size)

// EventHash computes an event's chain hash from its stored fields.
// payload and metadata are jsonb's text output.
func EventHash(prev []byte, streamID string, streamVersion int, typ string, schemaVersion int,
	payload, metadata string, recordedAt time.Time) []byte {
	h := sha256.New()
	var n [8]byte
	lp := func(s string) {
		binary.BigEndian.PutUint32(n[:4], uint32(len(s)))
		h.Write(n[:4])
		h.Write([]byte(s))
	}
	be32 := func(v int) {
		binary.BigEndian.PutUint32(n[:4], uint32(int32(v)))
		h.Write(n[:4])
	}
	h.Write(prev)
	lp(streamID)
	be32(streamVersion)
	lp(typ)
	be32(schemaVersion)
	lp(payload)
	lp(metadata)
	binary.BigEndian.PutUint64(n[:], uint64(recordedAt.UnixMicro()))
	h.Write(n[:])
	return h.Sum(nil)
}

// VerifyChain recomputes the hash chain of every stream (or only of the
// streams listed) and reports the first bad event of each stream. It reads
// in one REPEATABLE READ READ ONLY transaction: a consistent view that holds
// no transaction id, so it delays nobody.
func VerifyChain(ctx context.Context, db interface {
	BeginTx(ctx context.Context, opts pgx.TxOptions) (pgx.Tx, error)
}, streams ...string) (ChainReport, error) {
	start := time.Now()
	tx, err := db.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return ChainReport{}, fmt.Errorf("cannot begin: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	q := `SELECT position, stream_id, stream_version, type, schema_version, payload::text, metadata::text, recorded_at, prev_hash, hash
		FROM events`
	var args []any
	if len(streams) > 0 {
		q += ` WHERE stream_id = ANY($1)`
		args = append(args, streams)
	}
	q += ` ORDER BY stream_id, stream_version`
	rows, err := tx.Query(ctx, q, args...)
	if err != nil {
		return ChainReport{}, fmt.Errorf("cannot read events: %w", err)
	}
	defer rows.Close()

	var (
		rep       ChainReport
		cur       string // current stream
		curBad    bool   // a problem was reported for cur already
		lastVer   int
		lastHash  []byte // stored hash of the previous event in cur
		heads     = sha256.New()
		havePrev  bool
		pos       int64
		stream    string
		ver, sv   int
		typ       string
		payload   string
		metadata  string
		at        time.Time
		prev, got []byte
	)
	closeStream := func() {
		if havePrev {
			heads.Write([]byte(cur))
			heads.Write([]byte{0})
			var n [4]byte
			binary.BigEndian.PutUint32(n[:], uint32(lastVer))
			heads.Write(n[:])
			heads.Write(lastHash)
		}
	}
	report := func(p ChainProblem) {
		if !curBad {
			rep.Problems = append(rep.Problems, p)
			curBad = true
		}
	}
	_, err = pgx.ForEachRow(rows, []any{&pos, &stream, &ver, &typ, &sv, &payload, &metadata, &at, &prev, &got}, func() error {
		rep.Events++
		if stream != cur || !havePrev {
			closeStream()
			cur, curBad, havePrev = stream, false, true
			rep.Streams++
			if ver != 1 {
				report(ChainProblem{StreamID: stream, StreamVersion: ver, Position: pos, Type: typ, Kind: "version_gap",
					Detail: fmt.Sprintf("the stream starts at version %d: versions 1..%d are missing (deleted?)", ver, ver-1)})
			}
			lastHash, lastVer = zeroHash, ver-1
		}
		if ver != lastVer+1 {
			report(ChainProblem{StreamID: stream, StreamVersion: ver, Position: pos, Type: typ, Kind: "version_gap",
				Detail: fmt.Sprintf("versions %d..%d are missing before it (deleted?)", lastVer+1, ver-1)})
		}
		want := EventHash(prev, stream, ver, typ, sv, payload, metadata, at)
		switch {
		case !bytes.Equal(prev, lastHash):
			report(ChainProblem{StreamID: stream, StreamVersion: ver, Position: pos, Type: typ, Kind: "chain_broken",
				Detail: fmt.Sprintf("its prev_hash %s does not match the previous event's hash %s (an event before it was inserted, deleted or rewritten)",
					short(prev), short(lastHash))})
		case !bytes.Equal(got, want):
			report(ChainProblem{StreamID: stream, StreamVersion: ver, Position: pos, Type: typ, Kind: "edited",
				Detail: fmt.Sprintf("stored hash %s, recomputed %s: its type, versions, payload, metadata or time changed after it was written",
					short(got), short(want))})
		}
		// Link on the stored hash: an edit is reported at the edited event
		// and not again at its successor.
		lastHash, lastVer = got, ver
		return nil
	})
	if err != nil {
		return ChainReport{}, fmt.Errorf("cannot verify the event chain: %w", err)
	}
	closeStream()
	rep.HeadDigest = hex.EncodeToString(heads.Sum(nil))
	rep.Elapsed = time.Since(start)
	return rep, nil
}

func short(b []byte) string {
	s := hex.EncodeToString(b)
	if len(s) > 16 {
		return s[:16] + "…"
	}
	if s == "" {
		return "(none)"
	}
	return s
}
