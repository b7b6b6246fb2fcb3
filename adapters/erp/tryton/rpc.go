package tryton

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/dealbridge/dealbridge/domain"
)

const (
	maxBody    = 16 << 20 // a response body longer than this is unreadable
	maxMessage = 1024     // the Tryton message kept in a *domain.ERPError
)

// errUnauthorized marks an HTTP 401: the session is missing, expired, or
// not fresh enough for a fresh_session method (account.invoice.post).
var errUnauthorized = errors.New("tryton: HTTP 401 unauthorized")

// callKind says what a call may have changed, which decides how a failure
// after sending is classified.
type callKind int

const (
	// read changes nothing: every failure is safe to retry (transient).
	read callKind = iota
	// write may have taken effect when the response is lost (ambiguous).
	write
)

// rpcRequest is the JSON-RPC envelope. Tryton answers with the JSON error
// envelope only when the body holds exactly these three keys.
type rpcRequest struct {
	ID     int64  `json:"id"`
	Method string `json:"method"`
	Params []any  `json:"params"`
}

type rpcResponse struct {
	ID     int64           `json:"id"`
	Result json.RawMessage `json:"result"`
	Error  json.RawMessage `json:"error"`
}

// rpc sends one JSON-RPC call to url with the Authorization header auth
// (none when empty) and decodes the result into out (unless nil). Every
// failure is a *domain.ERPError; a 401 wraps errUnauthorized.
func (c *Client) rpc(ctx context.Context, url, auth, method string, params []any, out any, kind callKind) error {
	id := c.nextID.Add(1)
	body, err := json.Marshal(rpcRequest{ID: id, Method: method, Params: params})
	if err != nil {
		return &domain.ERPError{Class: domain.ErrorPermanent, Message: "tryton: encode " + method, Err: err}
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	// wrote records whether any byte of the request may have reached
	// Tryton: until then a failure proves the call had no effect.
	var wrote atomic.Bool
	trace := &httptrace.ClientTrace{
		WroteHeaders: func() { wrote.Store(true) },
		WroteRequest: func(httptrace.WroteRequestInfo) { wrote.Store(true) },
	}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return &domain.ERPError{Class: domain.ErrorPermanent, Message: "tryton: build request", Err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	start := time.Now()
	resp, err := c.http.Do(req)
	if err != nil {
		class, msg := domain.ErrorTransient, "request not sent"
		if wrote.Load() {
			msg = "request sent, no response"
			if kind == write {
				class = domain.ErrorAmbiguous
			}
		}
		return &domain.ERPError{Class: class, Message: "tryton: " + method + ": " + msg, Err: err}
	}
	defer resp.Body.Close()
	b, rerr := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	if rerr == nil && len(b) > maxBody {
		rerr = fmt.Errorf("response body exceeds %d bytes", maxBody)
	}
	c.log.DebugContext(ctx, "tryton call", "method", method, "status", resp.StatusCode, "elapsed", time.Since(start))

	if resp.StatusCode != http.StatusOK {
		return httpError(method, resp, b)
	}
	if rerr != nil {
		return unreadable(method, kind, resp.StatusCode, "unreadable response", rerr)
	}
	var r rpcResponse
	if err := json.Unmarshal(b, &r); err != nil {
		return unreadable(method, kind, resp.StatusCode, "undecodable response: "+truncate(string(b)), err)
	}
	if len(r.Error) > 0 && string(r.Error) != "null" {
		return rpcError(method, r.Error)
	}
	if out == nil {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(r.Result))
	dec.UseNumber()
	if err := dec.Decode(out); err != nil {
		return unreadable(method, kind, resp.StatusCode, "unexpected result: "+truncate(string(r.Result)), err)
	}
	return nil
}

// unreadable classifies a 200 whose body cannot be used: a write may have
// committed (ambiguous); a read is retried (transient).
func unreadable(method string, kind callKind, status int, msg string, err error) error {
	class := domain.ErrorTransient
	if kind == write {
		class = domain.ErrorAmbiguous
	}
	return &domain.ERPError{Class: class, StatusCode: status, Message: "tryton: " + method + ": " + msg, Err: err}
}

// httpError maps a bare HTTP status. Tryton sends these before it runs the
// method (401, 403, 404, 429) or when the body was not a pure JSON-RPC
// envelope; a proxy may add 502/503/504.
func httpError(method string, resp *http.Response, body []byte) error {
	s := resp.StatusCode
	e := &domain.ERPError{
		StatusCode: s,
		RetryAfter: parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()),
		Message:    "tryton: " + method + ": HTTP " + strconv.Itoa(s) + " " + http.StatusText(s),
	}
	if t := bodyText(body); t != "" {
		e.Message += ": " + t
	}
	switch {
	case s == http.StatusUnauthorized:
		e.Class, e.Err = domain.ErrorTransient, errUnauthorized
	case s == http.StatusTooManyRequests:
		// The login rate limit (after failed logins).
		e.Class = domain.ErrorRateLimited
	case s >= 500, s == http.StatusNotFound, s == http.StatusConflict, s == http.StatusLocked:
		// 404: unknown database, or Tryton could not connect to it (it
		// answers 404 to a login while PostgreSQL is down). 409/423: a
		// warning or a concurrency error. All may heal.
		e.Class = domain.ErrorTransient
	default:
		// 400 and 403 (method not exposed): the request itself is wrong.
		e.Class = domain.ErrorPermanent
	}
	return e
}

// rpcError maps Tryton's error envelope, [type, args] for its own
// exceptions and [str(exception), traceback] for any other.
func rpcError(method string, raw json.RawMessage) error {
	var parts []json.RawMessage
	if err := json.Unmarshal(raw, &parts); err != nil || len(parts) == 0 {
		return &domain.ERPError{Class: domain.ErrorTransient, Message: "tryton: " + method + ": unexpected error " + truncate(string(raw))}
	}
	var kind string
	_ = json.Unmarshal(parts[0], &kind)
	var args []json.RawMessage
	if len(parts) > 1 {
		_ = json.Unmarshal(parts[1], &args)
	}
	arg := func(i int) string {
		if i >= len(args) {
			return ""
		}
		var s string
		_ = json.Unmarshal(args[i], &s)
		return strings.TrimSpace(s)
	}
	e := &domain.ERPError{}
	switch kind {
	case "UserError":
		// [message, description, domain]: Tryton refuses the data; the
		// message is kept for the dead letter.
		e.Class = domain.ErrorPermanent
		e.Message = join(arg(0), arg(1))
	case "UserWarning":
		// [key, message, description]: needs a human to confirm.
		e.Class = domain.ErrorPermanent
		e.Message = join(arg(1), arg(2)) + " (Tryton warning " + arg(0) + ")"
	case "ConcurrencyException":
		e.Class = domain.ErrorTransient
		var s string
		_ = json.Unmarshal(parts[1], &s)
		e.Message = join("concurrent modification", s)
	case "RateLimitException":
		e.Class = domain.ErrorRateLimited
		e.Message = "rate limited"
	case "LoginException":
		e.Class = domain.ErrorTransient
		e.Message = join("login needs more", arg(1))
	default:
		// Any other server exception (a database error while PostgreSQL
		// restarts, a bug): its transaction was rolled back. Retried; an
		// unknown failure is never silently dropped.
		e.Class = domain.ErrorTransient
		e.Message = "server error: " + kind
	}
	e.Message = "tryton: " + method + ": " + truncate(e.Message)
	return e
}

func join(a, b string) string {
	switch {
	case b == "":
		return a
	case a == "":
		return b
	}
	return a + " - " + b
}

// bodyText is a short text form of a bare error body (HTML stripped to its
// title or first line).
func bodyText(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.Index(s, "<title>"); i >= 0 {
		s = s[i+len("<title>"):]
		if j := strings.Index(s, "</title>"); j >= 0 {
			s = s[:j]
		}
	} else if i := strings.Index(s, "<p>"); i >= 0 {
		s = s[i+3:]
		if j := strings.Index(s, "</p>"); j >= 0 {
			s = s[:j]
		}
	}
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return truncate(strings.TrimSpace(s))
}

// parseRetryAfter reads Retry-After (delay-seconds or an HTTP-date); 0 when
// absent, malformed or past.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n <= 0 {
			return 0
		}
		return time.Duration(min(n, int64(24*time.Hour/time.Second))) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := t.Sub(now); d > 0 {
			return d
		}
	}
	return 0
}

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

// isUnauthorized reports whether err is an HTTP 401 from Tryton.
func isUnauthorized(err error) bool { return errors.Is(err, errUnauthorized) }
