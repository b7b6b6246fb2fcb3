package erpsim

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// record is one line of the store file.
type record struct {
	Kind string `json:"kind"` // kindCreate or kindAttempt

	// kindCreate: the invoice, and the idempotency record that replays it.
	Invoice     *Invoice `json:"invoice,omitempty"`
	Fingerprint string   `json:"fingerprint,omitempty"`
	Status      int      `json:"status,omitempty"`
	Body        []byte   `json:"body,omitempty"` // exact response bytes

	// kindAttempt.
	Attempt *Attempt `json:"attempt,omitempty"`
}

const (
	kindCreate  = "create"
	kindAttempt = "attempt"
)

// store is an append-only JSON-lines file. Creates are fsynced before
// append returns; attempts are written without fsync (they reach the disk
// with the next create, or when the OS flushes).
type store struct {
	f *os.File
}

// openStore reads every record of path and opens it for appending. A torn
// last line (a crash mid-write: no trailing newline) is cut off; any other
// unreadable line is an error.
func openStore(path string) (*store, []record, error) {
	var recs []record
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, nil, fmt.Errorf("open store: %w", err)
	}
	fail := func(err error) (*store, []record, error) {
		f.Close()
		return nil, nil, err
	}
	r := bufio.NewReader(f)
	var good int64
	for line := 1; ; line++ {
		b, err := r.ReadBytes('\n')
		if errors.Is(err, io.EOF) {
			if len(bytes.TrimSpace(b)) > 0 {
				// Torn tail: drop it so the next append starts a clean line.
				if err := f.Truncate(good); err != nil {
					return fail(fmt.Errorf("truncate torn store tail: %w", err))
				}
			}
			break
		}
		if err != nil {
			return fail(fmt.Errorf("read store: %w", err))
		}
		if len(bytes.TrimSpace(b)) > 0 {
			var rec record
			if err := json.Unmarshal(b, &rec); err != nil {
				return fail(fmt.Errorf("store %s line %d: %w", path, line, err))
			}
			recs = append(recs, rec)
		}
		good += int64(len(b))
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		return fail(fmt.Errorf("seek store: %w", err))
	}
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("sync store: %w", err))
	}
	// Make the file's directory entry durable too (it may be new).
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return &store{f: f}, recs, nil
}

// append writes rec as one line; with sync it returns only after fsync.
func (s *store) append(rec record, sync bool) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode store record: %w", err)
	}
	if _, err := s.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("write store: %w", err)
	}
	if sync {
		if err := s.f.Sync(); err != nil {
			return fmt.Errorf("fsync store: %w", err)
		}
	}
	return nil
}

func (s *store) close() error { return s.f.Close() }
