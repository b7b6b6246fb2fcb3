package webhook_test

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/adapters/webhook"
	"github.com/dealbridge/dealbridge/domain"
)

var (
	secret = []byte("whsec_test_secret")
	body   = []byte(`{"id":"evt_test","type":"deal.closed"}`)
	t0     = time.Unix(1700000000, 0)
)

const tolerance = 5 * time.Minute

// The Stripe-style vector of reference/reliability.md: secret
// whsec_test_secret, t=1700000000, body {"id":"evt_test","type":"deal.closed"}
// (computed independently with openssl and Python).
func TestSignKnownVector(t *testing.T) {
	const want = "t=1700000000,v1=206259f7d5c2f8728ed14e9d604cd53e3052d0b236379d1416b0608fbc4e57e0"
	if got := webhook.Sign(secret, body, t0); got != want {
		t.Fatalf("Sign = %q\nwant   %q", got, want)
	}
}

func TestSignVerifyRoundTrip(t *testing.T) {
	for _, b := range [][]byte{body, {}, []byte("not json at all \x00\xff"), bytes.Repeat([]byte("x"), 1<<16)} {
		h := webhook.Sign(secret, b, t0)
		if err := webhook.Verify(secret, b, h, t0, tolerance); err != nil {
			t.Errorf("Verify(Sign(%.20q)) = %v", b, err)
		}
		// Anywhere inside the tolerance window, either side.
		for _, d := range []time.Duration{-tolerance, -time.Second, time.Second, tolerance} {
			if err := webhook.Verify(secret, b, h, t0.Add(d), tolerance); err != nil {
				t.Errorf("Verify at now%+v = %v, want nil (within %v)", d, err, tolerance)
			}
		}
	}
	// Whitespace around the parts is tolerated; a second v1 (secret
	// rotation) may be the matching one.
	h := webhook.Sign(secret, body, t0)
	ts, sig, _ := strings.Cut(h, ",")
	spaced := ts + " , " + sig
	if err := webhook.Verify(secret, body, spaced, t0, tolerance); err != nil {
		t.Errorf("Verify(%q) = %v", spaced, err)
	}
	rotated := ts + ",v1=" + strings.Repeat("0", 64) + "," + sig
	if err := webhook.Verify(secret, body, rotated, t0, tolerance); err != nil {
		t.Errorf("Verify with an old and the current v1 = %v, want nil", err)
	}
}

func TestVerifyRejects(t *testing.T) {
	good := webhook.Sign(secret, body, t0)
	ts, sig, _ := strings.Cut(good, ",")
	hexSig := strings.TrimPrefix(sig, "v1=")
	flipped := append([]byte(nil), body...)
	flipped[5] ^= 0x01
	cases := []struct {
		name   string
		secret []byte
		body   []byte
		header string
		now    time.Time
	}{
		{"one byte of the body changed", secret, flipped, good, t0},
		{"one byte appended to the body", secret, append(append([]byte(nil), body...), ' '), good, t0},
		{"body truncated", secret, body[:len(body)-1], good, t0},
		{"wrong secret", []byte("whsec_other_secret"), body, good, t0},
		{"secret off by one byte", []byte("whsec_test_secreT"), body, good, t0},
		{"empty secret", nil, body, good, t0},
		{"timestamp too old", secret, body, good, t0.Add(tolerance + time.Second)},
		{"timestamp in the future", secret, body, good, t0.Add(-tolerance - time.Second)},
		{"signature truncated by one hex digit", secret, body, ts + ",v1=" + hexSig[:len(hexSig)-1], t0},
		{"signature truncated to half", secret, body, ts + ",v1=" + hexSig[:32], t0},
		{"signature empty", secret, body, ts + ",v1=", t0},
		{"signature in upper case", secret, body, ts + ",v1=" + strings.ToUpper(hexSig), t0},
		{"signature of another timestamp", secret, body, "t=1700000001," + sig, t0},
		{"no signature part", secret, body, ts, t0},
		{"no timestamp part", secret, body, sig, t0},
		{"timestamp not a number", secret, body, "t=soon," + sig, t0},
		{"empty header", secret, body, "", t0},
		{"garbage header", secret, body, "garbage", t0},
		{"unknown scheme only", secret, body, ts + ",v0=" + hexSig, t0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := webhook.Verify(c.secret, c.body, c.header, c.now, tolerance); err == nil {
				t.Errorf("Verify(%q) = nil, want an error", c.header)
			}
		})
	}
}

// receiver is an alert webhook endpoint that answers the status codes it is
// given, in order, then 200.
type receiver struct {
	mu       sync.Mutex
	statuses []int
	reqs     []received
}

type received struct {
	body   []byte
	header http.Header
	method string
}

func (r *receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	b, _ := io.ReadAll(req.Body)
	r.mu.Lock()
	r.reqs = append(r.reqs, received{body: b, header: req.Header.Clone(), method: req.Method})
	status := http.StatusOK
	if len(r.statuses) > 0 {
		status, r.statuses = r.statuses[0], r.statuses[1:]
	}
	r.mu.Unlock()
	w.WriteHeader(status)
}

func (r *receiver) received() []received {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]received(nil), r.reqs...)
}

func alertMessage(t *testing.T) *message.Message {
	t.Helper()
	b, err := json.Marshal(domain.AlertRaised{
		AlertID: "0b9a1f0e-8a43-4c4e-9d3e-2f1d7f6d8c11", Kind: domain.AlertKindInvoiceFailed, Severity: domain.SeverityCritical,
		DealID: "5b1c9a7e-2f4d-4b8e-9c3a-1d2e3f4a5b6c", Message: "deal was not invoiced",
	})
	if err != nil {
		t.Fatal(err)
	}
	return message.NewMessage("2d7c5a9e-1b3f-4e6a-8c2d-9f0e1a2b3c4d", b)
}

// delivery is the queue's delivery number attempt of m, as the queue
// subscriber hands it to the handler.
func delivery(t *testing.T, m *message.Message, attempt int) *message.Message {
	d := m.Copy()
	d.Metadata.Set(queue.MetadataAttempt, strconv.Itoa(attempt))
	d.SetContext(t.Context())
	return d
}

func TestHandleRetriesThenDelivers(t *testing.T) {
	recv := &receiver{statuses: []int{http.StatusInternalServerError, http.StatusServiceUnavailable}}
	srv := httptest.NewServer(recv)
	t.Cleanup(srv.Close)
	policy := domain.RetryPolicy{Initial: 200 * time.Millisecond, Max: time.Second, MaxAttempts: 5}
	now := time.Now()
	s, err := webhook.New(webhook.Config{URL: srv.URL + "/hooks/alerts", Secret: secret, Retry: policy, Timeout: 5 * time.Second,
		Now: func() time.Time { return now }}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	m := alertMessage(t)

	for attempt := 1; attempt <= 2; attempt++ {
		d := delivery(t, m, attempt)
		err := s.Handle(d)
		if err == nil {
			t.Fatalf("attempt %d: Handle = nil on a 5xx answer, want an error (nack)", attempt)
		}
		v := d.Metadata.Get(queue.MetadataNackDelay)
		delay, perr := time.ParseDuration(v)
		if perr != nil || delay < 0 || delay > policy.Bound(attempt) {
			t.Errorf("attempt %d: nack delay %q, want a duration within [0, %v]", attempt, v, policy.Bound(attempt))
		}
		if r := d.Metadata.Get(queue.MetadataNackReason); !strings.Contains(r, "50") {
			t.Errorf("attempt %d: nack reason %q, want the status", attempt, r)
		}
	}
	if err := s.Handle(delivery(t, m, 3)); err != nil {
		t.Fatalf("attempt 3: Handle = %v on a 200 answer, want nil (ack)", err)
	}

	reqs := recv.received()
	if len(reqs) != 3 {
		t.Fatalf("%d requests, want 3", len(reqs))
	}
	for i, r := range reqs {
		if r.method != http.MethodPost || !bytes.Equal(r.body, m.Payload) {
			t.Errorf("request %d: %s with body %s, want POST with %s", i+1, r.method, r.body, m.Payload)
		}
		if err := webhook.Verify(secret, r.body, r.header.Get(webhook.SignatureHeader), now, tolerance); err != nil {
			t.Errorf("request %d: signature %q does not verify: %v", i+1, r.header.Get(webhook.SignatureHeader), err)
		}
		if got := r.header.Get(webhook.SignatureHeader); got != webhook.Sign(secret, m.Payload, now) {
			t.Errorf("request %d: signature %q, want %q", i+1, got, webhook.Sign(secret, m.Payload, now))
		}
		if r.header.Get("Idempotency-Key") != m.UUID || r.header.Get("Content-Type") != "application/json" {
			t.Errorf("request %d: headers %v, want Idempotency-Key %s and JSON", i+1, r.header, m.UUID)
		}
	}
}

// After the policy's attempts the notification is given up (acked, with an
// error log): the alert itself stays on the dashboard, and the queue must
// not hold it forever.
func TestHandleGivesUpAfterMaxAttempts(t *testing.T) {
	recv := &receiver{statuses: []int{http.StatusBadGateway, http.StatusBadGateway, http.StatusBadGateway}}
	srv := httptest.NewServer(recv)
	t.Cleanup(srv.Close)
	s, err := webhook.New(webhook.Config{URL: srv.URL, Secret: secret, Retry: domain.RetryPolicy{Initial: time.Millisecond, MaxAttempts: 3}},
		slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	m := alertMessage(t)
	for attempt := 1; attempt <= 2; attempt++ {
		if err := s.Handle(delivery(t, m, attempt)); err == nil {
			t.Fatalf("attempt %d: Handle = nil, want a nack", attempt)
		}
	}
	if err := s.Handle(delivery(t, m, 3)); err != nil {
		t.Fatalf("attempt 3 of 3: Handle = %v, want nil (given up)", err)
	}
	if n := len(recv.received()); n != 3 {
		t.Errorf("%d requests, want 3", n)
	}
}

// An unreachable receiver is a failed delivery (nack), not a crash.
func TestHandleUnreachable(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	s, err := webhook.New(webhook.Config{URL: url, Secret: secret, Timeout: time.Second, Retry: domain.RetryPolicy{MaxAttempts: 5}},
		slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	d := delivery(t, alertMessage(t), 1)
	if err := s.Handle(d); err == nil {
		t.Fatal("Handle = nil for an unreachable receiver, want a nack")
	}
	if d.Metadata.Get(queue.MetadataNackDelay) == "" {
		t.Error("no nack delay set")
	}
}

func TestNewValidatesConfig(t *testing.T) {
	for _, c := range []webhook.Config{
		{URL: "", Secret: secret},
		{URL: "http://127.0.0.1:1/x", Secret: nil},
		{URL: "ftp://example.com/x", Secret: secret},
		{URL: "127.0.0.1:8080/x", Secret: secret},
	} {
		if _, err := webhook.New(c, slog.New(slog.DiscardHandler)); err == nil {
			t.Errorf("New(%q, secret %q) = nil error", c.URL, c.Secret)
		}
	}
}
