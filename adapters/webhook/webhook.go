// Package webhook delivers alert notifications to an outbound HTTP webhook,
// signed with HMAC-SHA256 so the receiver can check they came from
// dealbridge and were not replayed.
//
// Notifications reach this handler through the outbox (written in the same
// transaction as the alert), so a webhook is sent if and only if its alert
// committed, at least once, with durable retries.
package webhook

import (
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/domain"
)

// HandlerName is the watermill handler name of the alert webhook.
const HandlerName = "alert-webhook"

// SignatureHeader carries "t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">".
const SignatureHeader = "Dealbridge-Signature"

// Config configures the sender.
type Config struct {
	// URL receives a POST per alert. Required.
	URL string
	// Secret keys the HMAC. Required.
	Secret []byte
	// Timeout of one delivery. Default 10s.
	Timeout time.Duration
	// Retry is the delivery retry policy. Default: domain defaults.
	Retry domain.RetryPolicy
	// Client overrides the HTTP client.
	Client *http.Client
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Sender posts alert notifications.
type Sender struct {
	cfg    Config
	logger *slog.Logger
}

// New returns a Sender; URL and Secret are required.
func New(cfg Config, logger *slog.Logger) (*Sender, error) {
	if cfg.URL == "" || len(cfg.Secret) == 0 {
		return nil, fmt.Errorf("alert webhook: URL and secret are both required")
	}
	if !strings.HasPrefix(cfg.URL, "http://") && !strings.HasPrefix(cfg.URL, "https://") {
		return nil, fmt.Errorf("alert webhook: URL %q must be http(s)", cfg.URL)
	}
	cfg.Timeout = cmp.Or(cfg.Timeout, 10*time.Second)
	if cfg.Client == nil {
		cfg.Client = &http.Client{Timeout: cfg.Timeout}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Sender{cfg: cfg, logger: logger}, nil
}

// Sign returns the signature header value for body at time t.
func Sign(secret, body []byte, t time.Time) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(ts + "."))
	mac.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

// Verify checks a signature header against body, accepting timestamps within
// tolerance of now. Receivers can use it as is.
func Verify(secret, body []byte, header string, now time.Time, tolerance time.Duration) error {
	var ts string
	var sigs []string
	for _, part := range strings.Split(header, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(part), "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			sigs = append(sigs, v)
		}
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || len(sigs) == 0 {
		return fmt.Errorf("malformed signature header")
	}
	if d := now.Sub(time.Unix(sec, 0)); d > tolerance || d < -tolerance {
		return fmt.Errorf("signature timestamp outside the %v tolerance", tolerance)
	}
	want := Sign(secret, body, time.Unix(sec, 0))
	for _, s := range sigs {
		if hmac.Equal([]byte("t="+ts+",v1="+s), []byte(want)) {
			return nil
		}
	}
	return fmt.Errorf("signature mismatch")
}

// Handle delivers one notification. A 2xx acks it; anything else nacks it
// with a backoff; after the policy's attempts it is dropped with an error
// log (the alert itself stays on the dashboard).
func (s *Sender) Handle(msg *message.Message) error {
	ctx, cancel := context.WithTimeout(msg.Context(), s.cfg.Timeout)
	defer cancel()
	err := s.post(ctx, msg)
	if err == nil {
		return nil
	}
	attempt := queue.Attempt(msg)
	if attempt >= s.cfg.Retry.MaxAttemptsOrDefault() {
		s.logger.ErrorContext(ctx, "alert webhook gave up", "message", msg.UUID, "attempts", attempt, "err", err)
		return nil
	}
	delay := s.cfg.Retry.Backoff(attempt, 0, rand.Float64())
	queue.SetNackDelay(msg, delay)
	queue.SetNackReason(msg, err.Error())
	return fmt.Errorf("alert webhook attempt %d (retry in %v): %w", attempt, delay, err)
}

func (s *Sender) post(ctx context.Context, msg *message.Message) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.cfg.URL, bytes.NewReader(msg.Payload))
	if err != nil {
		return fmt.Errorf("cannot build request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "dealbridge-alerts/1")
	req.Header.Set("Idempotency-Key", msg.UUID)
	req.Header.Set(SignatureHeader, Sign(s.cfg.Secret, msg.Payload, s.cfg.Now()))
	resp, err := s.cfg.Client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("webhook answered %s", resp.Status)
	}
	return nil
}
