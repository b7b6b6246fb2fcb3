package erp

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/dealbridge/dealbridge/domain"
)

const (
	defaultTimeout        = 10 * time.Second
	defaultConnectTimeout = 5 * time.Second
	defaultIdleConns      = 64

	// maxSuccessBody bounds how much of a 2xx body is read. A longer body
	// is treated as unreadable.
	maxSuccessBody = 8 << 20
	// maxErrorBody bounds how much of a non-2xx body is read for the
	// error message.
	maxErrorBody = 64 << 10
	// maxMessage bounds the ERP message kept in a *domain.ERPError.
	maxMessage = 512
)

// HTTPConfig configures an HTTPClient.
type HTTPConfig struct {
	// BaseURL is the ERP API root, e.g. "http://127.0.0.1:8089". Required.
	BaseURL string
	// Timeout bounds each call end to end (connect, send, wait, read the
	// body). Default 10s. A timeout after the request was written makes a
	// create ambiguous.
	Timeout time.Duration
	// ConnectTimeout bounds the TCP dial. Default 5s. Ignored when Client
	// is set (configure its Transport instead).
	ConnectTimeout time.Duration
	// IdleConns is how many idle keep-alive connections to the ERP the
	// client keeps for reuse: at least the number of concurrent callers
	// (the handler's consumers), or calls past it dial a new connection
	// and close it afterwards (net/http's default keeps 2; with 32
	// consumers a profile of `dealbridge bench` spent 5% of the handler's
	// CPU dialling). Default 64. Ignored when Client is set.
	IdleConns int
	// Client overrides the HTTP client. When nil a dedicated client with its
	// own transport is built.
	Client *http.Client
	// Logger receives one debug record per call and a warning per failure.
	// Default: discard.
	Logger *slog.Logger
}

// HTTPClient implements Port against an ERP that speaks the simulator's
// HTTP/JSON API:
//
//	POST /invoices                     Idempotency-Key: K, JSON body → 2xx invoice
//	GET  /invoices?idempotency_key=K   → JSON array of invoices
//
// It is safe for concurrent use. It never retries by itself (the saga owns
// retries, durably); note that net/http may transparently resend a request
// carrying an Idempotency-Key when a reused keep-alive connection turns out
// to be dead, which is safe because the ERP deduplicates on the key.
type HTTPClient struct {
	base    *url.URL
	client  *http.Client
	timeout time.Duration
	log     *slog.Logger
}

var _ Port = (*HTTPClient)(nil)

// NewHTTPClient returns a client for cfg. An unparsable BaseURL is reported
// by every call as a permanent error (a configuration error cannot heal by
// retrying).
func NewHTTPClient(cfg HTTPConfig) *HTTPClient {
	if cfg.Timeout <= 0 {
		cfg.Timeout = defaultTimeout
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = defaultConnectTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c := &HTTPClient{client: cfg.Client, timeout: cfg.Timeout, log: cfg.Logger}
	if c.client == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.DialContext = (&net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext
		tr.MaxIdleConnsPerHost = cmp.Or(max(cfg.IdleConns, 0), defaultIdleConns)
		tr.MaxIdleConns = max(tr.MaxIdleConns, tr.MaxIdleConnsPerHost)
		c.client = &http.Client{Transport: tr}
	}
	if u, err := url.Parse(strings.TrimRight(cfg.BaseURL, "/")); err == nil && u.Scheme != "" && u.Host != "" {
		c.base = u
	}
	return c
}

// wireRequest is the POST /invoices body; the key travels in the
// Idempotency-Key header.
type wireRequest struct {
	Reference    string `json:"reference"`
	CustomerID   string `json:"customer_id"`
	CustomerName string `json:"customer_name"`
	Currency     string `json:"currency"`
	Lines        []Line `json:"lines"`
	Total        string `json:"total"`
}

// wireInvoice is an invoice as the ERP API returns it.
type wireInvoice struct {
	Number         string    `json:"number"`
	Reference      string    `json:"reference"`
	IdempotencyKey string    `json:"idempotency_key"`
	CustomerID     string    `json:"customer_id"`
	Currency       string    `json:"currency"`
	Total          string    `json:"total"`
	Lines          []Line    `json:"lines"`
	Status         string    `json:"status"`
	CreatedAt      time.Time `json:"created_at"`
}

func (w wireInvoice) invoice() Invoice {
	return Invoice{
		Number: w.Number, Key: w.IdempotencyKey, Reference: w.Reference,
		CustomerID: w.CustomerID, Currency: w.Currency, Total: w.Total,
		Status: w.Status, Lines: w.Lines, CreatedAt: w.CreatedAt,
	}
}

// CreateInvoice posts req with header Idempotency-Key: req.Key.
//
// Outcome mapping: 2xx with a decodable invoice → ok; 5xx and 409 (a request
// with this key is still in flight) → transient; 429 → rate_limited with
// RetryAfter; other 4xx → permanent with the ERP's message; a failure before
// the request was written (DNS, refused, dial timeout) → transient; a
// failure after it was written (timeout, reset) or an unreadable or
// undecodable 2xx body → ambiguous. Retry-After is parsed on every status.
func (c *HTTPClient) CreateInvoice(ctx context.Context, req InvoiceRequest) (Invoice, error) {
	if req.Key == "" {
		return Invoice{}, &domain.ERPError{Class: domain.ErrorPermanent, Message: "empty idempotency key"}
	}
	body, err := json.Marshal(wireRequest{
		Reference: req.Reference, CustomerID: req.CustomerID, CustomerName: req.CustomerName,
		Currency: req.Currency, Lines: req.Lines, Total: req.Total,
	})
	if err != nil {
		return Invoice{}, &domain.ERPError{Class: domain.ErrorPermanent, Message: "encode invoice request", Err: err}
	}
	start := time.Now()
	resp, respBody, err := c.do(ctx, http.MethodPost, "/invoices", nil, body, func(h http.Header) {
		h.Set("Idempotency-Key", req.Key)
		h.Set("Content-Type", "application/json")
	})
	log := c.log.With("op", "create_invoice", "key", req.Key, "reference", req.Reference)
	if err != nil {
		log.WarnContext(ctx, "erp call failed", "err", err, "elapsed", time.Since(start))
		return Invoice{}, err
	}
	var w wireInvoice
	if err := json.Unmarshal(respBody, &w); err != nil {
		return Invoice{}, c.fail(ctx, log, &domain.ERPError{
			Class: domain.ErrorAmbiguous, StatusCode: resp.StatusCode,
			Message: "undecodable 2xx response: " + truncate(string(respBody)), Err: err,
		})
	}
	if w.Number == "" {
		return Invoice{}, c.fail(ctx, log, &domain.ERPError{
			Class: domain.ErrorAmbiguous, StatusCode: resp.StatusCode,
			Message: "2xx response without an invoice number: " + truncate(string(respBody)),
		})
	}
	if w.IdempotencyKey == "" {
		w.IdempotencyKey = req.Key
	} else if w.IdempotencyKey != req.Key {
		return Invoice{}, c.fail(ctx, log, &domain.ERPError{
			Class: domain.ErrorAmbiguous, StatusCode: resp.StatusCode,
			Message: fmt.Sprintf("2xx response for another idempotency key %q", w.IdempotencyKey),
		})
	}
	log.DebugContext(ctx, "erp invoice created", "status", resp.StatusCode, "number", w.Number,
		"replayed", resp.Header.Get("Idempotent-Replayed") == "true", "elapsed", time.Since(start))
	return w.invoice(), nil
}

// FindInvoiceByKey looks the invoice up with GET /invoices?idempotency_key=K.
// Only invoices whose idempotency_key equals key are considered, so an ERP
// that ignores the filter cannot produce a false match. Failures are
// transient, rate_limited or permanent, never ambiguous.
func (c *HTTPClient) FindInvoiceByKey(ctx context.Context, key string) (Invoice, bool, error) {
	if key == "" {
		return Invoice{}, false, &domain.ERPError{Class: domain.ErrorPermanent, Message: "empty idempotency key"}
	}
	log := c.log.With("op", "find_invoice_by_key", "key", key)
	resp, body, err := c.do(ctx, http.MethodGet, "/invoices", url.Values{"idempotency_key": {key}}, nil, nil)
	if err != nil {
		var e *domain.ERPError
		if errors.As(err, &e) && e.Class == domain.ErrorAmbiguous {
			e.Class = domain.ErrorTransient // a read has no effect to be unsure about
		}
		log.WarnContext(ctx, "erp call failed", "err", err)
		return Invoice{}, false, err
	}
	var list []wireInvoice
	if err := json.Unmarshal(body, &list); err != nil {
		return Invoice{}, false, c.fail(ctx, log, &domain.ERPError{
			Class: domain.ErrorTransient, StatusCode: resp.StatusCode,
			Message: "undecodable lookup response: " + truncate(string(body)), Err: err,
		})
	}
	var found []wireInvoice
	for _, w := range list {
		if w.IdempotencyKey == key {
			found = append(found, w)
		}
	}
	if len(found) == 0 {
		return Invoice{}, false, nil
	}
	inv := found[0].invoice()
	if len(found) > 1 {
		log.ErrorContext(ctx, "erp holds more than one invoice for one idempotency key", "count", len(found))
		for _, w := range found[1:] {
			inv.Duplicates = append(inv.Duplicates, w.invoice().Number)
		}
	}
	return inv, true, nil
}

func (c *HTTPClient) fail(ctx context.Context, log *slog.Logger, err *domain.ERPError) error {
	log.WarnContext(ctx, "erp call failed", "err", err)
	return err
}

// do sends one request and returns the response (body closed) and its body
// when the status is 2xx. Every other outcome is a *domain.ERPError.
func (c *HTTPClient) do(ctx context.Context, method, path string, query url.Values, body []byte, header func(http.Header)) (*http.Response, []byte, error) {
	if c.base == nil {
		return nil, nil, &domain.ERPError{Class: domain.ErrorPermanent, Message: "erp client: invalid BaseURL"}
	}
	u := c.base.JoinPath(path)
	u.RawQuery = query.Encode()

	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()

	// wrote records whether any byte of the request may have reached the
	// ERP: WroteRequest fires once the request (headers and body) has been
	// handed to the connection, successfully or not. Until then, a failure
	// proves the request was not sent.
	var wrote atomic.Bool
	trace := &httptrace.ClientTrace{
		WroteHeaders: func() { wrote.Store(true) },
		WroteRequest: func(httptrace.WroteRequestInfo) { wrote.Store(true) },
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), method, u.String(), rd)
	if err != nil {
		return nil, nil, &domain.ERPError{Class: domain.ErrorPermanent, Message: "build request", Err: err}
	}
	req.Header.Set("Accept", "application/json")
	if header != nil {
		header(req.Header)
	}

	resp, err := c.client.Do(req)
	if err != nil {
		class := domain.ErrorTransient
		msg := "request not sent"
		if wrote.Load() {
			class, msg = domain.ErrorAmbiguous, "request sent, no response"
		}
		return nil, nil, &domain.ERPError{Class: class, Message: msg, Err: fmt.Errorf("%s %s: %w", method, u.Redacted(), err)}
	}
	defer resp.Body.Close()

	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		b, err := io.ReadAll(io.LimitReader(resp.Body, maxSuccessBody+1))
		if err == nil && len(b) > maxSuccessBody {
			err = fmt.Errorf("response body exceeds %d bytes", maxSuccessBody)
		}
		if err != nil {
			return resp, nil, &domain.ERPError{
				Class: domain.ErrorAmbiguous, StatusCode: resp.StatusCode,
				Message: "unreadable 2xx response", Err: fmt.Errorf("%s %s: %w", method, u.Redacted(), err),
			}
		}
		return resp, b, nil
	}

	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	e := &domain.ERPError{
		StatusCode: resp.StatusCode,
		RetryAfter: parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()),
		Message:    errorMessage(resp, b),
	}
	switch s := resp.StatusCode; {
	case s == http.StatusTooManyRequests:
		e.Class = domain.ErrorRateLimited
	case s == http.StatusConflict, s >= 500:
		// 409: a request with the same key is still being processed.
		e.Class = domain.ErrorTransient
	case s >= 400:
		e.Class = domain.ErrorPermanent
	default:
		// 1xx/3xx as a final answer: we cannot tell what happened.
		e.Class = domain.ErrorAmbiguous
	}
	return resp, nil, e
}

// parseRetryAfter reads a Retry-After value: delay-seconds or an HTTP-date.
// It returns 0 when v is empty, malformed or in the past.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n <= 0 {
			return 0
		}
		const maxSeconds = int64(1<<63-1) / int64(time.Second)
		return time.Duration(min(n, maxSeconds)) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := t.Sub(now); d > 0 {
			return d
		}
	}
	return 0
}

// errorMessage extracts what the ERP said: problem+json detail or title (or
// a "message"/"error" field), else the body text, else the status text;
// truncated to maxMessage bytes.
func errorMessage(resp *http.Response, body []byte) string {
	var p struct {
		Title   string `json:"title"`
		Detail  string `json:"detail"`
		Message string `json:"message"`
		Error   any    `json:"error"`
	}
	if json.Unmarshal(body, &p) == nil {
		errStr, _ := p.Error.(string)
		for _, s := range []string{p.Detail, p.Title, p.Message, errStr} {
			if s = strings.TrimSpace(s); s != "" {
				return truncate(s)
			}
		}
	}
	if s := strings.TrimSpace(string(body)); s != "" {
		return truncate(s)
	}
	return http.StatusText(resp.StatusCode)
}

// truncate cuts s to at most maxMessage bytes on a rune boundary.
func truncate(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) <= maxMessage {
		return s
	}
	i := maxMessage
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + "…"
}
