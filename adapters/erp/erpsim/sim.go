// Package erpsim is a simulated ERP served over real HTTP, with Stripe-style
// idempotency keys, a durable ledger of every attempt and create, and a fault
// plan (errors, rate limits, rejections, latency, hangs, lost responses,
// downtime) that can be changed while it runs.
//
// API:
//
//	POST /invoices              create; header Idempotency-Key required
//	GET  /invoices              list; filters ?reference=DEAL_ID, ?idempotency_key=K
//	GET  /invoices/{number}     one invoice
//	GET  /healthz               liveness
//	GET  /_sim/ledger           every attempt and every create
//	GET  /_sim/stats            counts
//	GET  /_sim/faults           the fault plan
//	PUT  /_sim/faults           replace the fault plan
//
// Idempotency follows Stripe: the first successful create for a key stores
// its status and body; a later request with the same key and the same body
// gets exactly that response with header "Idempotent-Replayed: true" and
// creates nothing; the same key with a different body gets 422; a request
// for a key whose first request is still being processed gets 409.
// Requests that fail (validation, rejected customer, injected faults) store
// nothing under the key, so the same key can be used again with a corrected
// payload (the dead-letter re-inject path).
//
// Errors are RFC 9457 problem+json: {"type","title","status","detail"} plus
// "errors":[{"field","message"}] on validation failures.
package erpsim

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Config configures a Server.
type Config struct {
	// StorePath is the JSON-lines file that makes the simulator durable:
	// invoices and idempotency records are appended and fsynced before the
	// response is written, and reloaded by New. Empty keeps everything in
	// memory.
	StorePath string
	// Faults is the initial fault plan.
	Faults Faults
	// Seed seeds the fault generator.
	Seed int64
	// Logger defaults to discard.
	Logger *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Line is an invoice line; amounts are decimal strings.
type Line struct {
	SKU         string `json:"sku"`
	Description string `json:"description"`
	Quantity    int64  `json:"quantity"`
	UnitPrice   string `json:"unit_price"`
}

// Invoice is an invoice as the simulator stores and returns it.
type Invoice struct {
	Number         string    `json:"number"`
	Reference      string    `json:"reference"`
	IdempotencyKey string    `json:"idempotency_key"`
	CustomerID     string    `json:"customer_id"`
	CustomerName   string    `json:"customer_name"`
	Currency       string    `json:"currency"`
	Total          string    `json:"total"`
	Lines          []Line    `json:"lines"`
	Status         string    `json:"status"`
	CreatedAt      time.Time `json:"created_at"`
}

// Outcomes recorded in Attempt.Outcome.
const (
	OutcomeCreated      = "created"       // 201, invoice created
	OutcomeReplayed     = "replayed"      // stored response replayed
	OutcomeDropped      = "dropped"       // invoice created, response dropped
	OutcomeHung         = "hung"          // held until the client left; nothing created
	OutcomeFault        = "fault"         // injected 5xx or 429
	OutcomeDown         = "down"          // 503 while down
	OutcomeRejected     = "rejected"      // 4xx (validation, key reuse, rejected customer)
	OutcomeInFlight     = "in_flight"     // 409: same key still processing
	OutcomeClientGone   = "client_gone"   // the client left during injected latency
	OutcomeStorageError = "storage_error" // 500: the store write failed
)

// Attempt is one POST /invoices as the ledger records it.
type Attempt struct {
	Time      time.Time `json:"time"`
	Key       string    `json:"key"`
	Reference string    `json:"reference,omitempty"`
	Status    int       `json:"status"` // status answered (or that would have been, when dropped); 0 when hung
	Outcome   string    `json:"outcome"`
	Faults    []string  `json:"faults,omitempty"` // injected faults applied: latency, down, error, rate_limit, hang, drop_after_commit, reject_customer
	Number    string    `json:"number,omitempty"` // invoice created or replayed
}

// Create is one invoice creation as the ledger records it.
type Create struct {
	Time      time.Time `json:"time"`
	Key       string    `json:"key"`
	Reference string    `json:"reference"`
	Number    string    `json:"number"`
}

// Ledger is every attempt and every create, oldest first.
type Ledger struct {
	Attempts []Attempt `json:"attempts"`
	Creates  []Create  `json:"creates"`
}

// Stats counts the ledger. MaxCreatesPerKey above 1 would be a duplicate
// (it cannot happen unless the simulator is broken).
type Stats struct {
	Attempts          int            `json:"attempts"`
	Creates           int            `json:"creates"`
	Keys              int            `json:"keys"` // distinct keys with a create
	MaxCreatesPerKey  int            `json:"max_creates_per_key"`
	AttemptsByOutcome map[string]int `json:"attempts_by_outcome"`
}

// idem is the idempotency record of one key.
type idem struct {
	fingerprint string
	inFlight    bool
	status      int
	body        []byte
}

// Server is the simulated ERP. Its methods are safe for concurrent use.
type Server struct {
	log     *slog.Logger
	now     func() time.Time
	handler http.Handler

	done      chan struct{}
	closeOnce sync.Once

	// storeMu serialises creates and store writes; it is taken before mu,
	// never while holding mu, so lookups and in-flight checks proceed
	// during an fsync.
	storeMu sync.Mutex
	store   *store // nil when in memory or closed
	next    int    // next invoice sequence number

	mu       sync.Mutex
	rng      *rand.Rand
	faults   Faults
	invoices []Invoice
	byNumber map[string]int // index into invoices
	keys     map[string]*idem
	attempts []Attempt
}

// New returns a simulator. With cfg.StorePath set it reloads everything the
// file holds, so a restarted simulator remembers every invoice, idempotency
// record and ledger entry.
func New(cfg Config) (*Server, error) {
	if err := cfg.Faults.Validate(); err != nil {
		return nil, fmt.Errorf("erpsim: fault plan: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Server{
		log: cfg.Logger, now: cfg.Now, done: make(chan struct{}),
		rng:      rand.New(rand.NewPCG(uint64(cfg.Seed), 0x9e3779b97f4a7c15)),
		faults:   cfg.Faults.clone(),
		byNumber: map[string]int{}, keys: map[string]*idem{}, next: 1,
	}
	if cfg.StorePath != "" {
		st, recs, err := openStore(cfg.StorePath)
		if err != nil {
			return nil, fmt.Errorf("erpsim: %w", err)
		}
		s.store = st
		for _, r := range recs {
			s.apply(r)
		}
		s.log.Info("erpsim store loaded", "path", cfg.StorePath, "invoices", len(s.invoices), "attempts", len(s.attempts))
	}

	mux := http.NewServeMux()
	mux.HandleFunc("POST /invoices", s.handleCreate)
	mux.HandleFunc("GET /invoices", s.handleList)
	mux.HandleFunc("GET /invoices/{number}", s.handleGet)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /_sim/ledger", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, s.Ledger()) })
	mux.HandleFunc("GET /_sim/stats", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, s.Stats()) })
	mux.HandleFunc("GET /_sim/faults", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, s.Faults()) })
	mux.HandleFunc("PUT /_sim/faults", s.handlePutFaults)
	s.handler = mux
	return s, nil
}

// apply folds one stored record into memory.
func (s *Server) apply(r record) {
	switch r.Kind {
	case kindCreate:
		if r.Invoice == nil {
			return
		}
		inv := *r.Invoice
		s.byNumber[inv.Number] = len(s.invoices)
		s.invoices = append(s.invoices, inv)
		if _, ok := s.keys[inv.IdempotencyKey]; !ok {
			s.keys[inv.IdempotencyKey] = &idem{fingerprint: r.Fingerprint, status: r.Status, body: r.Body}
		}
		if n, err := strconv.Atoi(strings.TrimPrefix(inv.Number, "INV-")); err == nil && n >= s.next {
			s.next = n + 1
		}
	case kindAttempt:
		if r.Attempt != nil {
			s.attempts = append(s.attempts, *r.Attempt)
		}
	}
}

// Handler returns the simulator's HTTP API.
func (s *Server) Handler() http.Handler { return s.handler }

// Close releases hung requests and closes the store. Requests still running
// afterwards fail with 500 instead of creating.
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.done)
		s.storeMu.Lock()
		defer s.storeMu.Unlock()
		if s.store != nil {
			err = s.store.close()
			s.store = nil
		}
	})
	return err
}

func (s *Server) closed() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// Faults returns the current fault plan.
func (s *Server) Faults() Faults {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.faults.clone()
}

// SetFaults replaces the fault plan.
func (s *Server) SetFaults(f Faults) error {
	if err := f.Validate(); err != nil {
		return err
	}
	s.mu.Lock()
	s.faults = f.clone()
	s.mu.Unlock()
	s.log.Info("erpsim fault plan changed", "faults", f)
	return nil
}

// Ledger returns a copy of every attempt and create, oldest first.
func (s *Server) Ledger() Ledger {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := Ledger{Attempts: slices.Clone(s.attempts), Creates: make([]Create, 0, len(s.invoices))}
	if l.Attempts == nil {
		l.Attempts = []Attempt{}
	}
	for _, inv := range s.invoices {
		l.Creates = append(l.Creates, Create{Time: inv.CreatedAt, Key: inv.IdempotencyKey, Reference: inv.Reference, Number: inv.Number})
	}
	return l
}

// Stats counts the ledger.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Stats{Attempts: len(s.attempts), Creates: len(s.invoices), AttemptsByOutcome: map[string]int{}}
	for _, a := range s.attempts {
		st.AttemptsByOutcome[a.Outcome]++
	}
	perKey := map[string]int{}
	for _, inv := range s.invoices {
		perKey[inv.IdempotencyKey]++
		st.MaxCreatesPerKey = max(st.MaxCreatesPerKey, perKey[inv.IdempotencyKey])
	}
	st.Keys = len(perKey)
	return st
}

// Invoices returns a copy of every invoice, in creation order.
func (s *Server) Invoices() []Invoice {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.invoices)
}

// invoiceRequest is the POST /invoices body.
type invoiceRequest struct {
	Reference    string `json:"reference"`
	CustomerID   string `json:"customer_id"`
	CustomerName string `json:"customer_name"`
	Currency     string `json:"currency"`
	Lines        []Line `json:"lines"`
	Total        string `json:"total"`
}

// fingerprint identifies a request body independently of its formatting.
func (r invoiceRequest) fingerprint() string {
	b, _ := json.Marshal(r)
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

type fieldError struct {
	Field   string `json:"field"`
	Message string `json:"message"`
}

var (
	currencyRE = regexp.MustCompile(`^[A-Z]{3}$`)
	decimalRE  = regexp.MustCompile(`^-?[0-9]+(\.[0-9]+)?$`)
)

func (r invoiceRequest) validate() []fieldError {
	var errs []fieldError
	add := func(field, msg string) { errs = append(errs, fieldError{field, msg}) }
	if strings.TrimSpace(r.Reference) == "" {
		add("reference", "is required")
	}
	if strings.TrimSpace(r.CustomerID) == "" {
		add("customer_id", "is required")
	}
	if !currencyRE.MatchString(r.Currency) {
		add("currency", "must be 3 upper-case letters (ISO 4217)")
	}
	if len(r.Lines) == 0 {
		add("lines", "at least one line is required")
	}
	for i, l := range r.Lines {
		if l.Quantity <= 0 {
			add(fmt.Sprintf("lines[%d].quantity", i), "must be positive")
		}
		if !decimalRE.MatchString(l.UnitPrice) {
			add(fmt.Sprintf("lines[%d].unit_price", i), "must be a decimal string such as \"12.50\"")
		}
	}
	if !decimalRE.MatchString(r.Total) {
		add("total", "must be a decimal string such as \"12.50\"")
	}
	return errs
}

// roll is the fault draw of one POST.
type roll struct {
	rateLimit, fail, hang, drop bool
	failStatus                  int
}

func (s *Server) draw(f Faults) roll {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := roll{
		rateLimit: s.rng.Float64() < f.RateLimitRate,
		fail:      s.rng.Float64() < f.ErrorRate,
		hang:      s.rng.Float64() < f.HangRate,
		drop:      s.rng.Float64() < f.DropAfterCommitRate,
	}
	r.failStatus = http.StatusInternalServerError
	if s.rng.IntN(2) == 1 {
		r.failStatus = http.StatusServiceUnavailable
	}
	return r
}

// gate applies DownUntil and Latency. It returns false when it has answered
// (or the client left).
func (s *Server) gate(w http.ResponseWriter, r *http.Request, f Faults, at *Attempt) bool {
	if now := s.now(); now.Before(f.DownUntil) {
		secs := int(f.DownUntil.Sub(now)/time.Second) + 1
		w.Header().Set("Retry-After", strconv.Itoa(secs))
		if at != nil {
			at.Faults = append(at.Faults, "down")
			s.finish(at, http.StatusServiceUnavailable, OutcomeDown, "")
		}
		writeProblem(w, http.StatusServiceUnavailable, "ERP down for maintenance", nil)
		return false
	}
	if f.Latency > 0 {
		if at != nil {
			at.Faults = append(at.Faults, "latency")
		}
		t := time.NewTimer(f.Latency)
		defer t.Stop()
		select {
		case <-t.C:
		case <-r.Context().Done():
			if at != nil {
				s.finish(at, 0, OutcomeClientGone, "")
			}
			return false
		case <-s.done:
			writeProblem(w, http.StatusServiceUnavailable, "ERP shutting down", nil)
			return false
		}
	}
	return true
}

// finish records an attempt in the ledger.
func (s *Server) finish(at *Attempt, status int, outcome, number string) {
	at.Status, at.Outcome, at.Number = status, outcome, number
	s.mu.Lock()
	s.attempts = append(s.attempts, *at)
	s.mu.Unlock()
	s.storeMu.Lock()
	if s.store != nil {
		if err := s.store.append(record{Kind: kindAttempt, Attempt: at}, false); err != nil {
			s.log.Error("erpsim: ledger write failed", "err", err)
		}
	}
	s.storeMu.Unlock()
	s.log.Debug("erpsim attempt", "key", at.Key, "status", status, "outcome", outcome, "faults", at.Faults, "number", number)
}

const maxBody = 1 << 20

func (s *Server) handleCreate(w http.ResponseWriter, r *http.Request) {
	f := s.Faults()
	at := &Attempt{Time: s.now(), Key: r.Header.Get("Idempotency-Key")}
	if !s.gate(w, r, f, at) {
		return
	}
	if at.Key == "" {
		s.finish(at, http.StatusBadRequest, OutcomeRejected, "")
		writeProblem(w, http.StatusBadRequest, "missing Idempotency-Key header", nil)
		return
	}
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		status := http.StatusBadRequest
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			status = http.StatusRequestEntityTooLarge
		}
		s.finish(at, status, OutcomeRejected, "")
		writeProblem(w, status, "unreadable body: "+err.Error(), nil)
		return
	}
	var req invoiceRequest
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		s.finish(at, http.StatusBadRequest, OutcomeRejected, "")
		writeProblem(w, http.StatusBadRequest, "malformed JSON body: "+err.Error(), nil)
		return
	}
	at.Reference = req.Reference

	rl := s.draw(f)
	switch {
	case rl.rateLimit:
		at.Faults = append(at.Faults, "rate_limit")
		s.finish(at, http.StatusTooManyRequests, OutcomeFault, "")
		w.Header().Set("Retry-After", strconv.Itoa(f.RetryAfterSeconds))
		writeProblem(w, http.StatusTooManyRequests, "rate limit exceeded", nil)
		return
	case rl.fail:
		at.Faults = append(at.Faults, "error")
		s.finish(at, rl.failStatus, OutcomeFault, "")
		writeProblem(w, rl.failStatus, "injected server error", nil)
		return
	case rl.hang:
		at.Faults = append(at.Faults, "hang")
		select {
		case <-r.Context().Done():
		case <-s.done:
		}
		s.finish(at, 0, OutcomeHung, "")
		return
	}

	fp := req.fingerprint()
	s.mu.Lock()
	rec := s.keys[at.Key]
	switch {
	case rec == nil:
		s.keys[at.Key] = &idem{fingerprint: fp, inFlight: true}
		s.mu.Unlock()
	case rec.inFlight:
		s.mu.Unlock()
		s.finish(at, http.StatusConflict, OutcomeInFlight, "")
		writeProblem(w, http.StatusConflict, "a request with this Idempotency-Key is still being processed; retry later", nil)
		return
	case rec.fingerprint != fp:
		s.mu.Unlock()
		s.finish(at, http.StatusUnprocessableEntity, OutcomeRejected, "")
		writeProblem(w, http.StatusUnprocessableEntity,
			"Idempotency-Key reused with different parameters", []fieldError{{"Idempotency-Key", "already used with a different request body"}})
		return
	default:
		status, body := rec.status, rec.body
		s.mu.Unlock()
		var inv Invoice
		_ = json.Unmarshal(body, &inv)
		s.finish(at, status, OutcomeReplayed, inv.Number)
		w.Header().Set("Idempotent-Replayed", "true")
		writeRaw(w, status, "application/json", body)
		return
	}

	// This request owns the key until it stores a response or releases it.
	release := func() {
		s.mu.Lock()
		delete(s.keys, at.Key)
		s.mu.Unlock()
	}
	if errs := req.validate(); len(errs) > 0 {
		release()
		s.finish(at, http.StatusUnprocessableEntity, OutcomeRejected, "")
		writeProblem(w, http.StatusUnprocessableEntity, "invalid invoice: "+joinErrors(errs), errs)
		return
	}
	if slices.Contains(f.RejectCustomers, req.CustomerID) {
		release()
		at.Faults = append(at.Faults, "reject_customer")
		s.finish(at, http.StatusUnprocessableEntity, OutcomeRejected, "")
		errs := []fieldError{{"customer_id", "unknown customer " + req.CustomerID}}
		writeProblem(w, http.StatusUnprocessableEntity, "unknown customer "+req.CustomerID, errs)
		return
	}

	inv, body, err := s.create(at.Key, fp, req)
	if err != nil {
		release()
		s.log.Error("erpsim: create failed", "key", at.Key, "err", err)
		s.finish(at, http.StatusInternalServerError, OutcomeStorageError, "")
		writeProblem(w, http.StatusInternalServerError, "could not store the invoice", nil)
		return
	}
	if rl.drop {
		at.Faults = append(at.Faults, "drop_after_commit")
		s.finish(at, http.StatusCreated, OutcomeDropped, inv.Number)
		dropConnection(w)
		return
	}
	s.finish(at, http.StatusCreated, OutcomeCreated, inv.Number)
	w.Header().Set("Location", "/invoices/"+inv.Number)
	writeRaw(w, http.StatusCreated, "application/json", body)
}

// create allocates the next number and stores the invoice and its
// idempotency record durably (fsync) before returning.
func (s *Server) create(key, fp string, req invoiceRequest) (Invoice, []byte, error) {
	s.storeMu.Lock()
	defer s.storeMu.Unlock()
	if s.closed() {
		return Invoice{}, nil, errors.New("simulator closed")
	}
	inv := Invoice{
		Number: fmt.Sprintf("INV-%06d", s.next), Reference: req.Reference, IdempotencyKey: key,
		CustomerID: req.CustomerID, CustomerName: req.CustomerName, Currency: req.Currency,
		Total: req.Total, Lines: req.Lines, Status: "posted", CreatedAt: s.now().UTC(),
	}
	body, err := json.Marshal(inv)
	if err != nil {
		return Invoice{}, nil, fmt.Errorf("encode invoice: %w", err)
	}
	rec := record{Kind: kindCreate, Invoice: &inv, Fingerprint: fp, Status: http.StatusCreated, Body: body}
	if s.store != nil {
		if err := s.store.append(rec, true); err != nil {
			return Invoice{}, nil, err
		}
	}
	s.next++
	s.mu.Lock()
	s.byNumber[inv.Number] = len(s.invoices)
	s.invoices = append(s.invoices, inv)
	s.keys[key] = &idem{fingerprint: fp, status: http.StatusCreated, body: body}
	s.mu.Unlock()
	return inv, body, nil
}

// dropConnection closes the client connection without writing a response.
func dropConnection(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		// Not hijackable (HTTP/2): abort the stream instead.
		panic(http.ErrAbortHandler)
	}
	conn.Close()
}

func (s *Server) handleList(w http.ResponseWriter, r *http.Request) {
	if !s.gate(w, r, s.Faults(), nil) {
		return
	}
	q := r.URL.Query()
	ref, key := q.Get("reference"), q.Get("idempotency_key")
	s.mu.Lock()
	out := make([]Invoice, 0)
	for _, inv := range s.invoices {
		if (!q.Has("reference") || inv.Reference == ref) && (!q.Has("idempotency_key") || inv.IdempotencyKey == key) {
			out = append(out, inv)
		}
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleGet(w http.ResponseWriter, r *http.Request) {
	if !s.gate(w, r, s.Faults(), nil) {
		return
	}
	s.mu.Lock()
	i, ok := s.byNumber[r.PathValue("number")]
	var inv Invoice
	if ok {
		inv = s.invoices[i]
	}
	s.mu.Unlock()
	if !ok {
		writeProblem(w, http.StatusNotFound, "no invoice "+r.PathValue("number"), nil)
		return
	}
	writeJSON(w, http.StatusOK, inv)
}

func (s *Server) handlePutFaults(w http.ResponseWriter, r *http.Request) {
	var f Faults
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		writeProblem(w, http.StatusBadRequest, "malformed fault plan: "+err.Error(), nil)
		return
	}
	if err := s.SetFaults(f); err != nil {
		writeProblem(w, http.StatusUnprocessableEntity, err.Error(), nil)
		return
	}
	writeJSON(w, http.StatusOK, s.Faults())
}

func joinErrors(errs []fieldError) string {
	parts := make([]string, len(errs))
	for i, e := range errs {
		parts[i] = e.Field + ": " + e.Message
	}
	return strings.Join(parts, "; ")
}

type problem struct {
	Type   string       `json:"type"`
	Title  string       `json:"title"`
	Status int          `json:"status"`
	Detail string       `json:"detail,omitempty"`
	Errors []fieldError `json:"errors,omitempty"`
}

func writeProblem(w http.ResponseWriter, status int, detail string, errs []fieldError) {
	b, _ := json.Marshal(problem{Type: "about:blank", Title: http.StatusText(status), Status: status, Detail: detail, Errors: errs})
	writeRaw(w, status, "application/problem+json", b)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeProblem(w, http.StatusInternalServerError, "encode response: "+err.Error(), nil)
		return
	}
	writeRaw(w, status, "application/json", b)
}

func writeRaw(w http.ResponseWriter, status int, contentType string, body []byte) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
