// Package tryton is an erp.Port for Tryton 6.0 over JSON-RPC: it invoices a
// closed deal as a posted customer invoice.
//
// # Idempotency
//
// Tryton has no idempotency key and no unique constraint on an invoice's
// reference, so the client drives a state machine off Tryton's own data,
// with the idempotency key K in the invoice's reference:
//
//	search reference = K, type out, state != cancelled
//	  none                → create (draft), then post
//	  one draft/validated → post (a crash between create and post heals here)
//	  one posted/paid     → done: return it
//	  more than one       → a permanent error wrapping erp.ErrDuplicateInvoice
//
// The search-then-create is not atomic, so two concurrent calls for one K
// would both create. The service therefore serialises per deal before it
// calls: the work queue's ordering key (the deal id) allows at most one
// in-flight message per deal across every handler process, and this client
// also holds an in-process lock per K. Nothing else may create invoices
// with these references.
//
// FindInvoiceByKey reports only posted or paid invoices (they have a
// number); a draft counts as not found, so the saga retries CreateInvoice,
// which posts it.
//
// # Sessions
//
// One session per Client (common.db.login), sent as "Authorization: Session
// …". On any HTTP 401 the client logs in again and retries the call once:
// account.invoice.post needs a fresh session (idle < 300 s), and Tryton
// deletes a session it refuses. The company from the user's preferences
// goes into every call's context and into the invoice's values.
//
// # Errors
//
// Every error is a *domain.ERPError: Tryton's UserError and UserWarning →
// permanent, with Tryton's message; HTTP 5xx, connection errors, server
// exceptions, concurrency errors → transient; HTTP 429 → rate_limited; a
// timeout or reset after a create or post was sent → ambiguous (reads are
// transient). A customer or product missing from Tryton is permanent.
package tryton

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/domain"
)

// CustomerMatch says how a CRM customer id finds its Tryton party.
type CustomerMatch string

const (
	// MatchCode: the party's code equals the CRM customer id.
	MatchCode CustomerMatch = "code"
	// MatchIdentifier: one of the party's identifiers (party.identifier
	// code, optionally of Config.IdentifierType) equals the CRM customer id.
	MatchIdentifier CustomerMatch = "identifier"
)

// MissingCustomer says what happens when no party matches.
type MissingCustomer string

const (
	// RejectMissing: a permanent error (the deal is compensated and its
	// payload dead-lettered; fix the customer id and re-inject).
	RejectMissing MissingCustomer = "reject"
	// CreateMissing: create the party (name from the deal, code or
	// identifier from the CRM customer id, one empty address).
	CreateMissing MissingCustomer = "create"
)

// Config configures a Client.
type Config struct {
	// URL is the server root, e.g. "http://127.0.0.1:8000". Required.
	URL string
	// Database is the Tryton database name. Required.
	Database string
	// User and Password log in (common.db.login). Required.
	User     string
	Password string
	// Language of Tryton's messages. Default "en".
	Language string
	// Timeout bounds each JSON-RPC call. Default 30s (post renders the
	// invoice report and takes up to a few seconds under load).
	Timeout time.Duration
	// ConnectTimeout bounds the TCP dial. Default 5s. Ignored with Client.
	ConnectTimeout time.Duration
	// Client overrides the HTTP client.
	Client *http.Client
	// CustomerMatch is how a deal's customer id maps to a party. Default
	// MatchCode.
	CustomerMatch CustomerMatch
	// IdentifierType restricts MatchIdentifier to identifiers of this
	// type (e.g. "eu_vat"); empty: any type.
	IdentifierType string
	// MissingCustomer is RejectMissing (default) or CreateMissing.
	MissingCustomer MissingCustomer
	// ProductCode, when set, is the product of every invoice line (the
	// deal's SKU goes into the line's description). Empty: each line's SKU
	// is the code of its product.
	ProductCode string
	// Logger receives debug records per call and warnings. Default discard.
	Logger *slog.Logger
}

// Client is an erp.Port for Tryton. It is safe for concurrent use.
type Client struct {
	cfg      Config
	endpoint string // URL/<db>/
	http     *http.Client
	log      *slog.Logger
	nextID   atomic.Int64
	cfgErr   error

	mu   sync.Mutex
	sess *session
	// loginSem serialises logins (a failed login slows the next one
	// server-side; one at a time is enough).
	loginSem chan struct{}
	postSem  chan struct{} // one post at a time (the strict sequence lock)
	keys     keyLocks

	curMu      sync.Mutex
	currencies map[string]int64 // code → id
	curCodes   map[int64]string // id → code
}

type session struct {
	auth    string         // the Authorization header
	context map[string]any // the context of every call
	company int64
}

var _ erp.Port = (*Client)(nil)

// New returns a client for cfg. It does not connect: the first call logs
// in. A configuration error is reported by every call as permanent.
func New(cfg Config) *Client {
	if cfg.Language == "" {
		cfg.Language = "en"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 5 * time.Second
	}
	if cfg.CustomerMatch == "" {
		cfg.CustomerMatch = MatchCode
	}
	if cfg.MissingCustomer == "" {
		cfg.MissingCustomer = RejectMissing
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Client{cfg: cfg, http: cfg.Client, log: cfg.Logger.With("erp", "tryton"), loginSem: make(chan struct{}, 1), postSem: make(chan struct{}, 1),
		currencies: map[string]int64{}, curCodes: map[int64]string{}}
	if c.http == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.DialContext = (&net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext
		// Keep a connection per concurrent caller (net/http keeps 2 idle
		// per host and dials anew past them; see erp.HTTPConfig.IdleConns).
		tr.MaxIdleConnsPerHost = 64
		c.http = &http.Client{Transport: tr}
	}
	c.cfgErr = cfg.validate()
	if c.cfgErr == nil {
		u, _ := url.Parse(strings.TrimRight(cfg.URL, "/"))
		c.endpoint = u.JoinPath(cfg.Database).String() + "/"
	}
	return c
}

// Validate reports what is wrong with cfg, if anything.
func (cfg Config) Validate() error {
	if cfg.CustomerMatch == "" {
		cfg.CustomerMatch = MatchCode
	}
	if cfg.MissingCustomer == "" {
		cfg.MissingCustomer = RejectMissing
	}
	return cfg.validate()
}

func (cfg Config) validate() error {
	var errs []error
	if u, err := url.Parse(cfg.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		errs = append(errs, fmt.Errorf("tryton URL %q is not an http(s) URL", cfg.URL))
	}
	if cfg.Database == "" {
		errs = append(errs, errors.New("no tryton database"))
	}
	if cfg.User == "" {
		errs = append(errs, errors.New("no tryton user"))
	}
	if cfg.Password == "" {
		errs = append(errs, errors.New("no tryton password"))
	}
	switch cfg.CustomerMatch {
	case MatchCode, MatchIdentifier:
	default:
		errs = append(errs, fmt.Errorf("tryton customer match %q: want code or identifier", cfg.CustomerMatch))
	}
	switch cfg.MissingCustomer {
	case RejectMissing, CreateMissing:
	default:
		errs = append(errs, fmt.Errorf("tryton missing customer %q: want reject or create", cfg.MissingCustomer))
	}
	return errors.Join(errs...)
}

// Close logs the session out (best effort).
func (c *Client) Close() error {
	c.mu.Lock()
	s := c.sess
	c.sess = nil
	c.mu.Unlock()
	if s == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.rpc(ctx, c.endpoint, s.auth, "common.db.logout", []any{}, nil, read)
}

// session returns the current session, logging in when there is none.
func (c *Client) session(ctx context.Context) (*session, error) {
	c.mu.Lock()
	s := c.sess
	c.mu.Unlock()
	if s != nil {
		return s, nil
	}
	return c.login(ctx, nil)
}

// login replaces stale (nil: no session yet) with a new session, unless
// another goroutine has already done so.
func (c *Client) login(ctx context.Context, stale *session) (*session, error) {
	select {
	case c.loginSem <- struct{}{}:
	case <-ctx.Done():
		return nil, &domain.ERPError{Class: domain.ErrorTransient, Message: "tryton: waiting to log in", Err: ctx.Err()}
	}
	defer func() { <-c.loginSem }()
	c.mu.Lock()
	if c.sess != nil && c.sess != stale {
		s := c.sess
		c.mu.Unlock()
		return s, nil
	}
	c.sess = nil
	c.mu.Unlock()

	var res []any
	err := c.rpc(ctx, c.endpoint, "", "common.db.login",
		[]any{c.cfg.User, map[string]any{"password": c.cfg.Password}, c.cfg.Language}, &res, read)
	if err != nil {
		var e *domain.ERPError
		if errors.As(err, &e) && isUnauthorized(err) {
			// A wrong user or password: an operator must fix the
			// configuration. Not permanent: that would compensate every
			// deal for a configuration mistake.
			e.Message = fmt.Sprintf("tryton: login as %q to database %q refused (HTTP 401): wrong user or password", c.cfg.User, c.cfg.Database)
			e.Err = nil
		}
		return nil, err
	}
	if len(res) != 2 {
		return nil, &domain.ERPError{Class: domain.ErrorTransient, Message: fmt.Sprintf("tryton: unexpected login result %v", res)}
	}
	uid, ok := idOf(res[0])
	key, _ := res[1].(string)
	if !ok || key == "" {
		return nil, &domain.ERPError{Class: domain.ErrorTransient, Message: fmt.Sprintf("tryton: unexpected login result %v", res)}
	}
	s := &session{auth: "Session " + base64.StdEncoding.EncodeToString([]byte(c.cfg.User+":"+strconv.FormatInt(uid, 10)+":"+key))}
	var prefs map[string]any
	if err := c.rpc(ctx, c.endpoint, s.auth, "model.res.user.get_preferences", []any{true, map[string]any{}}, &prefs, read); err != nil {
		return nil, err
	}
	company, ok := idOf(prefs["company"])
	if !ok {
		return nil, &domain.ERPError{Class: domain.ErrorPermanent,
			Message: fmt.Sprintf("tryton: user %q has no current company: set one in the user's preferences", c.cfg.User)}
	}
	s.company = company
	s.context = map[string]any{"company": company, "language": c.cfg.Language}
	for _, k := range []string{"companies", "employee", "company_filter"} {
		if v, ok := prefs[k]; ok && v != nil {
			s.context[k] = v
		}
	}
	c.mu.Lock()
	c.sess = s
	c.mu.Unlock()
	c.log.DebugContext(ctx, "tryton session opened", "user", c.cfg.User, "company", company)
	return s, nil
}

// call runs a model method with the session's context as last parameter.
// On HTTP 401 it logs in again and retries once.
func (c *Client) call(ctx context.Context, method string, args []any, out any, kind callKind) error {
	if c.cfgErr != nil {
		return &domain.ERPError{Class: domain.ErrorPermanent, Message: "tryton client configuration: " + c.cfgErr.Error()}
	}
	s, err := c.session(ctx)
	if err != nil {
		return err
	}
	err = c.rpc(ctx, c.endpoint, s.auth, method, append(args[:len(args):len(args)], s.context), out, kind)
	if !isUnauthorized(err) {
		return err
	}
	c.log.InfoContext(ctx, "tryton session refused; logging in again", "method", method)
	if s, err = c.login(ctx, s); err != nil {
		return err
	}
	err = c.rpc(ctx, c.endpoint, s.auth, method, append(args[:len(args):len(args)], s.context), out, kind)
	if isUnauthorized(err) {
		var e *domain.ERPError
		errors.As(err, &e)
		e.Message = "tryton: " + method + ": refused (HTTP 401) right after a new login"
	}
	return err
}

// company returns the session's company (logging in if needed).
func (c *Client) company(ctx context.Context) (int64, map[string]any, error) {
	s, err := c.session(ctx)
	if err != nil {
		return 0, nil, err
	}
	return s.company, s.context, nil
}

// keyLocks is a set of per-key mutexes that waiters can abandon.
type keyLocks struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	ch   chan struct{}
	refs int
}

// lock takes the lock of key, or gives up when ctx ends.
func (k *keyLocks) lock(ctx context.Context, key string) (unlock func(), err error) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyLock{}
	}
	l := k.locks[key]
	if l == nil {
		l = &keyLock{ch: make(chan struct{}, 1)}
		k.locks[key] = l
	}
	l.refs++
	k.mu.Unlock()
	release := func() {
		k.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
	select {
	case l.ch <- struct{}{}:
		return func() { <-l.ch; release() }, nil
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	}
}
