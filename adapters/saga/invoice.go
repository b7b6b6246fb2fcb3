// Package saga runs the invoice saga: it consumes invoice requests from the
// handler transport, calls the ERP with the request's idempotency key K, and
// records every outcome in short local transactions.
//
// Delivery is at-least-once, so every step is idempotent: the ERP
// deduplicates creates by K, recording an invoice twice is a no-op, and
// compensating twice is a no-op. No database transaction is open while the
// ERP is called (invariant I5).
//
// What happens on failure:
//   - transient or rate-limited: the failed attempt is recorded on the saga's
//     stream with the time of the next one (exponential backoff, full jitter,
//     Retry-After honoured) and the message is nacked with that delay: the
//     retry lives in the database and survives any crash;
//   - ambiguous (the request may have reached the ERP): the invoice is looked
//     up by K first; found → recorded; not found → retried with the same K;
//   - circuit breaker open: the message is put back until the breaker's
//     cool-down ends, and no attempt is spent;
//   - permanent, or retries exhausted: after a last lookup by K, ONE
//     transaction records InvoiceFailed, reverts the deal, releases the
//     inventory, raises an alert and dead-letters the message;
//   - poison (undecodable, unknown type or version, invalid): a *PoisonError,
//     which the PoisonQueue middleware turns into a dead letter.
package saga

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/crashpoint"
	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// HandlerName is the watermill handler name of the invoice saga.
const HandlerName = "invoice-saga"

// PoisonError marks a message that can never be processed as it is.
type PoisonError struct{ Reason string }

func (e *PoisonError) Error() string { return "poison message: " + e.Reason }

// IsPoison reports whether err means the message is poison.
func IsPoison(err error) bool { return errors.As(err, new(*PoisonError)) }

// Config configures the invoice handler. Zero values mean the defaults.
type Config struct {
	// Retry is the retry policy of ERP calls.
	Retry domain.RetryPolicy
	// Rand returns a number in [0,1) for jitter. Default math/rand/v2.
	Rand func() float64
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// InvoiceHandler handles invoice requests.
type InvoiceHandler struct {
	store  *postgres.Store
	erp    erp.Port
	cfg    Config
	logger *slog.Logger
}

// NewInvoiceHandler returns the invoice saga handler.
func NewInvoiceHandler(store *postgres.Store, port erp.Port, cfg Config, logger *slog.Logger) *InvoiceHandler {
	if store == nil || port == nil {
		panic("saga.NewInvoiceHandler: nil dependency")
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if logger == nil {
		logger = slog.Default()
	}
	return &InvoiceHandler{store: store, erp: port, cfg: cfg, logger: logger}
}

// Decode reads and validates an invoice request message. Every failure is a
// *PoisonError: retrying cannot fix the message.
func Decode(msg *message.Message) (domain.InvoiceRequest, error) {
	var req domain.InvoiceRequest
	if t := msg.Metadata.Get(outbox.MetadataType); t != outbox.TypeInvoiceRequest {
		return req, &PoisonError{Reason: fmt.Sprintf("unknown message type %q", t)}
	}
	if v := msg.Metadata.Get(outbox.MetadataSchemaVersion); v != "1" {
		return req, &PoisonError{Reason: fmt.Sprintf("unsupported schema version %q of %s", v, outbox.TypeInvoiceRequest)}
	}
	dec := json.NewDecoder(bytes.NewReader(msg.Payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return req, &PoisonError{Reason: "cannot decode invoice request: " + err.Error()}
	}
	if err := Validate(req); err != nil {
		return req, &PoisonError{Reason: "invalid invoice request: " + err.Error()}
	}
	return req, nil
}

// Validate checks an invoice request against its schema; errors name the
// field.
func Validate(req domain.InvoiceRequest) error { return domain.ValidateInvoiceRequest(req) }

// Handle processes one invoice request. A nil return acks the message; an
// error nacks it, with the delay set on the message (queue.SetNackDelay).
func (h *InvoiceHandler) Handle(msg *message.Message) error {
	ctx := msg.Context()
	req, err := Decode(msg)
	if err != nil {
		return err
	}
	log := h.logger.With("deal", req.DealID, "key", req.IdempotencyKey, "message", msg.UUID)
	saga, ok, err := h.store.Saga(ctx, req.IdempotencyKey)
	if err != nil {
		return err
	}
	if !ok {
		// The saga row commits with the outbox row, so a request without a
		// saga was not produced by a close.
		return &PoisonError{Reason: "no invoice saga for key " + req.IdempotencyKey}
	}
	if saga.DealID != req.DealID {
		return &PoisonError{Reason: fmt.Sprintf("key %s belongs to deal %s, not %s", req.IdempotencyKey, saga.DealID, req.DealID)}
	}
	switch saga.State {
	case domain.SagaInvoiced, domain.SagaCompensated, "failed":
		log.DebugContext(ctx, "saga already ended; redelivery acknowledged", "state", saga.State)
		return nil
	}
	// A Retry-After holds whatever the transport does: a delivery before
	// the recorded next_attempt_at of a rate-limited attempt (the handler
	// died between recording the failure and the nack, so the message came
	// back at lease expiry; or the nack failed) waits for it. (An early
	// retry after a plain backoff is within what full jitter allows.)
	if saga.NextAttemptAt != nil && saga.ErrorClass != nil && *saga.ErrorClass == string(domain.ErrorRateLimited) {
		if wait := saga.NextAttemptAt.Sub(h.cfg.Now()); wait > 0 {
			queue.SetNackDelay(msg, wait)
			queue.SetNackReason(msg, "next attempt not due yet")
			return fmt.Errorf("deal %s: attempt %d not due until %s", req.DealID, saga.Attempts+1, saga.NextAttemptAt.UTC().Format(time.RFC3339Nano))
		}
	}
	meta := domain.Metadata{
		CorrelationID: msg.Metadata.Get(outbox.MetadataCorrelationID), CausationID: msg.UUID, Actor: HandlerName,
	}

	// After a failed attempt, the ERP may hold the invoice already (a lost
	// response, or an ERP that deduplicates nothing): look it up first. So
	// on a redelivery too: the handler that had the message may have
	// created the invoice and then failed to record it (a crash, a lost
	// lease, the database away), with no failed attempt recorded; an ERP
	// that deduplicates nothing would otherwise get a second invoice.
	if saga.Attempts > 0 || queue.Attempt(msg) > 1 {
		inv, found, err := h.erp.FindInvoiceByKey(ctx, req.IdempotencyKey)
		if err != nil {
			return h.retryLater(ctx, msg, req, saga, err, 0, log, meta)
		}
		if found {
			return h.record(ctx, msg, req, inv, log, meta)
		}
	}

	start := h.cfg.Now()
	inv, err := h.erp.CreateInvoice(ctx, toERP(req))
	latency := h.cfg.Now().Sub(start)
	if err == nil {
		return h.record(ctx, msg, req, inv, log, meta)
	}
	if ctx.Err() != nil {
		// Shutting down or the lease is lost: the attempt says nothing
		// about the ERP. Put the message back without spending an attempt.
		return fmt.Errorf("deal %s: stopped during the ERP call: %w", req.DealID, context.Cause(ctx))
	}
	if domain.ClassOf(err) == domain.ErrorAmbiguous {
		inv, found, lerr := h.erp.FindInvoiceByKey(ctx, req.IdempotencyKey)
		switch {
		case lerr == nil && found:
			log.InfoContext(ctx, "ambiguous ERP outcome resolved by lookup: the invoice exists", "invoice", inv.Number)
			return h.record(ctx, msg, req, inv, log, meta)
		case lerr == nil:
			log.InfoContext(ctx, "ambiguous ERP outcome resolved by lookup: no invoice; retrying with the same key")
		default:
			log.WarnContext(ctx, "ambiguous ERP outcome and the lookup failed; retrying with the same key", "err", lerr)
		}
	}
	return h.retryLater(ctx, msg, req, saga, err, latency, log, meta)
}

// retryLater records a failed attempt and schedules the next one, or ends
// the saga when the error is permanent or the retries are exhausted.
func (h *InvoiceHandler) retryLater(ctx context.Context, msg *message.Message, req domain.InvoiceRequest, saga postgres.SagaView,
	cause error, latency time.Duration, log *slog.Logger, meta domain.Metadata) error {
	var erpErr *domain.ERPError
	errors.As(cause, &erpErr)
	if errors.Is(cause, erp.ErrBreakerOpen) {
		// The ERP is known to be down: pause this saga until the breaker
		// lets a probe through, without spending an attempt.
		d := time.Second
		if erpErr != nil && erpErr.RetryAfter > 0 {
			d = erpErr.RetryAfter
		}
		d += time.Duration(h.cfg.Rand() * float64(d/4))
		queue.SetNackDelay(msg, d)
		queue.SetNackReason(msg, "erp circuit breaker open")
		log.DebugContext(ctx, "erp breaker open; saga paused", "for", d)
		return fmt.Errorf("deal %s: %w", req.DealID, cause)
	}
	now := h.cfg.Now().UTC()
	attempt := saga.Attempts + 1
	first := now
	if saga.FirstAttemptAt != nil {
		first = *saga.FirstAttemptAt
	}
	class := domain.ClassOf(cause)
	var retryAfter time.Duration
	ev := domain.InvoiceAttemptFailed{
		DealID: req.DealID, IdempotencyKey: req.IdempotencyKey, Attempt: attempt, ErrorClass: class,
		Message: truncate(cause.Error()), LatencyMS: latency.Milliseconds(), AttemptedAt: now,
	}
	if erpErr != nil {
		ev.StatusCode = erpErr.StatusCode
		retryAfter = erpErr.RetryAfter
	}
	if class == domain.ErrorPermanent || h.cfg.Retry.Exhausted(attempt, first, now) {
		ev.Final = true
		return h.fail(ctx, msg, req, cause, ev, first, log, meta)
	}
	delay := h.cfg.Retry.Backoff(attempt, retryAfter, h.cfg.Rand())
	ev.NextAttemptAt = now.Add(delay)
	if err := h.store.RecordAttemptFailure(ctx, ev, saga.Version, meta); err != nil {
		// Not recorded: retry soon; the attempt will be made again.
		queue.SetNackDelay(msg, min(delay, time.Second))
		return errors.Join(cause, err)
	}
	queue.SetNackDelay(msg, delay)
	queue.SetNackReason(msg, ev.Message)
	log.InfoContext(ctx, "ERP attempt failed; retry scheduled", "attempt", attempt, "class", class, "in", delay, "err", cause)
	return fmt.Errorf("deal %s: attempt %d: %w", req.DealID, attempt, cause)
}

// fail ends the saga: compensation, alert and dead letter in one
// transaction — after a last lookup, so that a deal whose invoice exists is
// never compensated.
//
// final is the attempt that ended the saga; it is recorded (with its status
// and latency) in the compensating transaction.
func (h *InvoiceHandler) fail(ctx context.Context, msg *message.Message, req domain.InvoiceRequest,
	cause error, final domain.InvoiceAttemptFailed, first time.Time, log *slog.Logger, meta domain.Metadata) error {
	class, attempts, now := final.ErrorClass, final.Attempt, final.AttemptedAt
	// A duplicate (erp.ErrDuplicateInvoice: the ERP holds more than one
	// invoice for K) is found by this lookup too: record then raises the
	// duplicate_invoice alert and records the oldest, and the deal is never
	// compensated.
	inv, found, err := h.erp.FindInvoiceByKey(ctx, req.IdempotencyKey)
	if err != nil {
		// Cannot tell whether the ERP holds the invoice: do not
		// compensate blind. Look again later.
		queue.SetNackDelay(msg, h.cfg.Retry.Backoff(attempts, 0, h.cfg.Rand()))
		return fmt.Errorf("deal %s: lookup before compensation failed: %w", req.DealID, err)
	}
	if found {
		return h.record(ctx, msg, req, inv, log, meta)
	}
	if errors.Is(cause, erp.ErrDuplicateInvoice) {
		// Duplicates, none of them posted: compensation follows, and a human
		// must still void the extra drafts.
		if err := h.alertDuplicate(ctx, req, cause.Error(), meta); err != nil {
			return errors.Join(cause, err)
		}
	}
	reasonClass := string(class)
	reason := cause.Error()
	if class != domain.ErrorPermanent {
		reasonClass = domain.ClassExhausted
		reason = fmt.Sprintf("retries exhausted after %d attempt(s); last error (%s): %s", attempts, class, cause.Error())
	}
	res, err := h.store.Compensate(ctx, req, postgres.Failure{
		ErrorClass: reasonClass, Reason: truncate(reason), Attempts: attempts, FirstFailureAt: first, LastFailureAt: now,
		FinalAttempt: &final,
	}, postgres.DeadLetterSource{
		MessageUUID: msg.UUID, Topic: outbox.InvoiceTopic, Handler: HandlerName,
		Payload: msg.Payload, Metadata: map[string]string(msg.Metadata),
	}, meta)
	if err != nil {
		var terr *domain.TransitionError
		if !errors.As(err, &terr) {
			return err // the database is unreachable or similar: retry later
		}
		// The deal is in a state compensation cannot handle. Raising an
		// alert and acknowledging ends it: never a loop.
		_, aerr := h.store.RaiseAlert(ctx, domain.AlertRaised{
			Kind: domain.AlertKindCompensationFailed, Severity: domain.SeverityCritical, DealID: req.DealID,
			IdempotencyKey: req.IdempotencyKey,
			Message:        fmt.Sprintf("compensation of deal %s could not complete: %v (failure: %s)", req.DealID, err, reason),
		}, meta)
		if aerr != nil {
			return errors.Join(err, aerr)
		}
		log.ErrorContext(ctx, "compensation could not complete; alert raised", "err", err)
		return nil
	}
	switch res.Outcome {
	case postgres.AlreadyInvoiced:
		log.InfoContext(ctx, "deal already invoiced; not compensated")
	case postgres.AlreadyCompensated:
		log.InfoContext(ctx, "deal already compensated")
	default:
		log.WarnContext(ctx, "invoice failed: deal reverted, inventory released, alert raised, message dead-lettered",
			"class", reasonClass, "attempts", attempts, "alert", res.AlertID, "dead_letter", res.DeadLetterID, "reason", reason)
	}
	return nil
}

// record records inv as the invoice of req and acknowledges msg in the same
// transaction (queue.AckTx), so that a crash after the commit cannot
// redeliver a message whose work is done.
func (h *InvoiceHandler) record(ctx context.Context, msg *message.Message, req domain.InvoiceRequest, inv erp.Invoice, log *slog.Logger, meta domain.Metadata) error {
	if inv.Number == "" {
		return fmt.Errorf("deal %s: the ERP returned an invoice without a number", req.DealID)
	}
	if len(inv.Duplicates) > 0 {
		// The ERP holds more than one invoice for K (an ERP without
		// idempotency, e.g. Tryton): this one is recorded, and a human must
		// void the others. Alerted before recording, once per key, so a
		// crash in between cannot lose the alert and a redelivery cannot
		// repeat it.
		msg := fmt.Sprintf("the ERP holds %d invoices for key %s: %s (recorded) and %s; cancel or credit all but the recorded one in the ERP",
			len(inv.Duplicates)+1, req.IdempotencyKey, inv.Number, strings.Join(inv.Duplicates, ", "))
		if err := h.alertDuplicate(ctx, req, msg, meta); err != nil {
			return err
		}
	}
	crashpoint.Hit(crashpoint.AfterERP2xxBeforeCommit)
	recorded, err := h.store.RecordInvoiceWith(ctx, req.DealID, req.IdempotencyKey, inv.Number, meta, h.ackTx(msg))
	if err != nil {
		var terr *domain.TransitionError
		if errors.As(err, &terr) {
			// The invoice exists in the ERP but the deal moved on (e.g.
			// compensated by a concurrent delivery): a human must look.
			return h.alertDuplicate(ctx, req,
				fmt.Sprintf("ERP invoice %s exists for deal %s but the deal is %s", inv.Number, req.DealID, terr.From), meta)
		}
		return err
	}
	queue.AckTxCommitted(msg)
	log.InfoContext(ctx, "deal invoiced", "invoice", inv.Number, "recorded", recorded)
	crashpoint.Hit(crashpoint.AfterCommitBeforeAck)
	return nil
}

// ackTx returns the step that acknowledges msg inside the recording
// transaction, when msg came from the work queue (tests may hand the
// handler messages of their own).
func (h *InvoiceHandler) ackTx(msg *message.Message) func(*pgx.Batch) error {
	if !queue.Delivered(msg) {
		return nil
	}
	return func(b *pgx.Batch) error { return queue.QueueAckTx(b, msg) }
}

// alertDuplicate raises the critical duplicate_invoice alert of req's key,
// once per key.
func (h *InvoiceHandler) alertDuplicate(ctx context.Context, req domain.InvoiceRequest, message string, meta domain.Metadata) error {
	id, raised, err := h.store.RaiseAlertOnce(ctx, domain.AlertRaised{
		Kind: domain.AlertKindDuplicateInvoice, Severity: domain.SeverityCritical, DealID: req.DealID,
		IdempotencyKey: req.IdempotencyKey, Message: truncate(message),
	}, meta)
	if err != nil {
		return err
	}
	if raised {
		h.logger.ErrorContext(ctx, "duplicate invoice alert raised", "deal", req.DealID, "key", req.IdempotencyKey, "alert", id, "detail", message)
	}
	return nil
}

func truncate(s string) string {
	const n = 2000
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

func toERP(r domain.InvoiceRequest) erp.InvoiceRequest {
	lines := make([]erp.Line, len(r.Lines))
	for i, l := range r.Lines {
		lines[i] = erp.Line{SKU: l.SKU, Description: l.Description, Quantity: l.Quantity, UnitPrice: l.UnitPrice}
	}
	return erp.InvoiceRequest{
		Key: r.IdempotencyKey, Reference: r.DealID, CustomerID: r.Customer.ID, CustomerName: r.Customer.Name,
		Currency: r.Currency, Lines: lines, Total: r.Total,
	}
}
