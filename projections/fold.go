package projections

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/domain"
)

// The in-memory fold: a rebuild's fast path.
//
// A rebuild starts from empty tables, so instead of running Apply's
// statements one by one against the shadow tables, a rebuild can fold each
// event's effect into Go values that mirror the rows (one map per table,
// keyed like the table's primary key), and then write the final rows with
// COPY. foldEvent below is Apply's twin: for every event type it does to
// the in-memory row exactly what apply's SQL does to the table row.
// TestFoldEqualsApply replays a varied log (every event type, upcast legacy
// events included) both ways and compares the tables, so the two cannot
// drift apart unnoticed.
//
// The fold only has to agree with Apply on logs that Apply folds without an
// error. Whenever it meets something whose SQL outcome it does not model
// exactly — an UPDATE of a missing row, an INSERT of an existing key, a
// value the SQL types would reject (a text with a NUL byte, an integer out
// of range, a time outside years 1–9999, a uuid not in its canonical or
// 32-digit form), or shadow tables whose columns differ from the ones it
// knows — it stops with a *foldUnsupported, and Replay rebuilds one event
// at a time with Apply instead, which reports the exact error (or succeeds)
// as before. A COPY that fails falls back the same way.

// foldUnsupported says why the in-memory fold cannot rebuild this log.
type foldUnsupported struct{ reason string }

func (e *foldUnsupported) Error() string { return "in-memory fold unsupported: " + e.reason }

func unsupported(r rawEvent, format string, args ...any) error {
	return &foldUnsupported{reason: fmt.Sprintf("event %d (%s %s/%d): %s", r.rec.Position, r.typ, r.rec.StreamID, r.rec.StreamVersion,
		fmt.Sprintf(format, args...))}
}

// foldColumns is the shape of the tables the fold writes, as
// information_schema describes them: name, data type, default, nullable,
// generated. foldSupported compares the shadow tables with it; a migration
// that changes a projection table must change foldEvent, the row types and
// this together (TestFoldEqualsApply fails until it does).
var foldColumns = map[string]string{
	"deals": `id uuid - NO NEVER; customer_id text - NO NEVER; customer_name text - NO NEVER; currency text - NO NEVER;
		lines jsonb - NO NEVER; total text - NO NEVER; status text - NO NEVER; version integer - NO NEVER;
		close_version integer - YES NEVER; status_before_close text - YES NEVER; idempotency_key text - YES NEVER;
		invoice_number text - YES NEVER; created_at timestamp_with_time_zone - NO NEVER; updated_at timestamp_with_time_zone - NO NEVER`,
	"inventory": `sku text - NO NEVER; available bigint - NO NEVER; allocated bigint 0 NO NEVER; version integer - NO NEVER;
		updated_at timestamp_with_time_zone - NO NEVER`,
	"invoice_sagas": `idempotency_key text - NO NEVER; deal_id uuid - NO NEVER; state text - NO NEVER; invoice_number text - YES NEVER;
		started_at timestamp_with_time_zone - NO NEVER; updated_at timestamp_with_time_zone - NO NEVER; version integer 0 NO NEVER;
		attempts integer 0 NO NEVER; error_class text - YES NEVER; last_error text - YES NEVER;
		first_attempt_at timestamp_with_time_zone - YES NEVER; last_attempt_at timestamp_with_time_zone - YES NEVER;
		next_attempt_at timestamp_with_time_zone - YES NEVER`,
	"alerts": `id uuid - NO NEVER; kind text - NO NEVER; severity text - NO NEVER; state text - NO NEVER; deal_id uuid - YES NEVER;
		idempotency_key text - YES NEVER; dead_letter_id uuid - YES NEVER; message text - NO NEVER; version integer - NO NEVER;
		created_at timestamp_with_time_zone - NO NEVER; updated_at timestamp_with_time_zone - NO NEVER`,
	"dead_letters": `id uuid - NO NEVER; state text - NO NEVER; deal_id uuid - YES NEVER; idempotency_key text - YES NEVER;
		message_uuid text - NO NEVER; topic text - NO NEVER; handler text - NO NEVER; payload bytea - NO NEVER; metadata jsonb - NO NEVER;
		reason text - NO NEVER; error_class text - NO NEVER; attempts integer - NO NEVER;
		first_failure_at timestamp_with_time_zone - NO NEVER; last_failure_at timestamp_with_time_zone - NO NEVER;
		version integer - NO NEVER; created_at timestamp_with_time_zone - NO NEVER; updated_at timestamp_with_time_zone - NO NEVER;
		revision integer 0 NO NEVER; needs_approval boolean false NO NEVER; approved_by text - YES NEVER; reinjects integer 0 NO NEVER;
		reason_search tsvector - YES ALWAYS`,
}

// foldSupported checks that the fold knows the shadow tables exactly. It
// returns why not, or "".
func foldSupported(ctx context.Context, q querier, schema string, tables []string) (string, error) {
	if len(tables) != len(foldColumns) {
		return fmt.Sprintf("the fold writes %d tables, the replay has %d", len(foldColumns), len(tables)), nil
	}
	for _, t := range tables {
		want, ok := foldColumns[t]
		if !ok {
			return fmt.Sprintf("the fold does not know table %s", t), nil
		}
		rows, err := q.Query(ctx, `SELECT column_name || ' ' || replace(data_type, ' ', '_') || ' ' || coalesce(column_default, '-')
				|| ' ' || is_nullable || ' ' || is_generated
			FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position`, schema, t)
		if err != nil {
			return "", fmt.Errorf("cannot read the columns of %s: %w", t, err)
		}
		cols, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return "", fmt.Errorf("cannot read the columns of %s: %w", t, err)
		}
		if got := strings.Join(cols, "; "); got != normalizeColumns(want) {
			return fmt.Sprintf("table %s has columns %q, the fold knows %q", t, got, normalizeColumns(want)), nil
		}
	}
	return "", nil
}

func normalizeColumns(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// uuid is a uuid value, the key of the tables whose primary key is one.
type uuid [16]byte

func (u uuid) appendText(b []byte) []byte {
	var s [36]byte
	hex.Encode(s[0:8], u[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], u[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], u[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], u[8:10])
	s[23] = '-'
	hex.Encode(s[24:], u[10:])
	return append(b, s[:]...)
}

// parseUUID accepts the forms that PostgreSQL's uuid input certainly
// accepts (8-4-4-4-12 or 32 hex digits, either case); anything else is left
// to Apply.
func parseUUID(s string) (uuid, bool) {
	var u uuid
	switch len(s) {
	case 36:
		if s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
			return u, false
		}
		s = s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:]
	case 32:
	default:
		return u, false
	}
	if _, err := hex.Decode(u[:], []byte(s)); err != nil {
		return u, false
	}
	return u, true
}

type (
	nullString struct {
		s     string
		valid bool
	}
	nullUUIDValue struct {
		u     uuid
		valid bool
	}
	nullTime struct {
		t     time.Time
		valid bool
	}
	nullInt4 struct {
		v     int32
		valid bool
	}
)

// values validates what apply would send as statement arguments, and
// converts them to what the columns store. The first problem is kept.
type values struct{ problem string }

func (c *values) fail(p string) {
	if c.problem == "" {
		c.problem = p
	}
}

func (c *values) text(s string) string {
	if strings.IndexByte(s, 0) >= 0 {
		c.fail("a text value holds a NUL byte")
	}
	return s
}

func (c *values) nullText(s string) nullString {
	if s == "" {
		return nullString{}
	}
	return nullString{s: c.text(s), valid: true}
}

func (c *values) uuid(s string) uuid {
	u, ok := parseUUID(s)
	if !ok {
		c.fail(fmt.Sprintf("uuid %q is not in a form the fold models", s))
	}
	return u
}

func (c *values) nullUUID(s string) nullUUIDValue {
	if s == "" {
		return nullUUIDValue{}
	}
	return nullUUIDValue{u: c.uuid(s), valid: true}
}

func (c *values) int4(v int) int32 {
	if int64(v) != int64(int32(v)) {
		c.fail(fmt.Sprintf("integer %d out of range", v))
	}
	return int32(v)
}

// time is what a timestamptz column stores of t: microseconds, floored, as
// pgx encodes it.
func (c *values) time(t time.Time) time.Time {
	t = t.Truncate(time.Microsecond).UTC()
	if y := t.Year(); y < 1 || y > 9999 {
		c.fail(fmt.Sprintf("time %s outside years 1-9999", t))
	}
	return t
}

func (c *values) bytes(b []byte) []byte {
	if b == nil {
		c.fail("a NULL for a NOT NULL bytea")
	}
	return b
}

func (c *values) addInt4(a int32, b int) int32 {
	s := int64(a) + int64(b)
	if s != int64(int32(s)) {
		c.fail(fmt.Sprintf("integer %d + %d out of range", a, b))
	}
	return int32(s)
}

func (c *values) addInt8(a, b int64) int64 {
	s := a + b
	if (b > 0 && s < a) || (b < 0 && s > a) {
		c.fail(fmt.Sprintf("bigint %d + %d out of range", a, b))
	}
	return s
}

func (c *values) subInt8(a, b int64) int64 {
	s := a - b
	if (b > 0 && s > a) || (b < 0 && s < a) {
		c.fail(fmt.Sprintf("bigint %d - %d out of range", a, b))
	}
	return s
}

type dealRow struct {
	id                                               uuid
	customerID, customerName, currency               string
	lines                                            []byte
	total, status                                    string
	version                                          int32
	closeVersion                                     nullInt4
	statusBeforeClose, idempotencyKey, invoiceNumber nullString
	createdAt, updatedAt                             time.Time
}

type inventoryRow struct {
	sku                  string
	available, allocated int64
	version              int32
	updatedAt            time.Time
}

type sagaRow struct {
	key                                         string
	dealID                                      uuid
	state                                       string
	invoiceNumber                               nullString
	startedAt, updatedAt                        time.Time
	version, attempts                           int32
	errorClass, lastError                       nullString
	firstAttemptAt, lastAttemptAt, nextAttempAt nullTime
}

type alertRow struct {
	id                    uuid
	kind, severity, state string
	dealID                nullUUIDValue
	key                   nullString
	deadLetterID          nullUUIDValue
	message               string
	version               int32
	createdAt, updatedAt  time.Time
}

type deadLetterRow struct {
	id                            uuid
	state                         string
	dealID                        nullUUIDValue
	key                           nullString
	messageUUID, topic, handler   string
	payload, metadata             []byte
	reason, errorClass            string
	attempts                      int32
	firstFailureAt, lastFailureAt time.Time
	version                       int32
	createdAt, updatedAt          time.Time
	revision                      int32
	needsApproval                 bool
	approvedBy                    nullString
	reinjects                     int32
}

// foldState holds the rows of one partition of the streams (partitionOf),
// in maps keyed like the tables and in insertion order.
type foldState struct {
	deals       map[uuid]*dealRow
	dealOrder   []*dealRow
	inventory   map[string]*inventoryRow
	invOrder    []*inventoryRow
	sagas       map[string]*sagaRow
	sagaOrder   []*sagaRow
	alerts      map[uuid]*alertRow
	alertOrder  []*alertRow
	letters     map[uuid]*deadLetterRow
	letterOrder []*deadLetterRow
}

func newFoldState() *foldState {
	return &foldState{
		deals:     map[uuid]*dealRow{},
		inventory: map[string]*inventoryRow{},
		sagas:     map[string]*sagaRow{},
		alerts:    map[uuid]*alertRow{},
		letters:   map[uuid]*deadLetterRow{},
	}
}

// foldEvent does to the in-memory rows what apply does to the tables.
func (s *foldState) foldEvent(raw rawEvent, r domain.RecordedEvent) error {
	var c values
	at := c.time(r.RecordedAt)
	sv := c.int4(r.StreamVersion)
	missing := func(table string) error {
		if c.problem != "" {
			return unsupported(raw, "%s", c.problem)
		}
		return unsupported(raw, "no %s row to update", table)
	}
	switch e := r.Event.(type) {
	case domain.DealCreated:
		lines, err := json.Marshal(e.Lines)
		if err != nil {
			return err
		}
		d := &dealRow{id: c.uuid(e.DealID), customerID: c.text(e.Customer.ID), customerName: c.text(e.Customer.Name),
			currency: c.text(e.Currency), lines: lines, total: c.text(e.Total), status: string(domain.StatusOpen), version: sv,
			createdAt: at, updatedAt: at}
		if _, ok := s.deals[d.id]; ok {
			return unsupported(raw, "deal inserted twice")
		}
		s.deals[d.id] = d
		s.dealOrder = append(s.dealOrder, d)
	case domain.DealWon:
		d := s.deals[c.uuid(e.DealID)]
		if d == nil {
			return missing("deals")
		}
		d.status, d.version, d.closeVersion = string(domain.StatusWon), sv, nullInt4{v: c.int4(e.CloseVersion), valid: true}
		d.statusBeforeClose = nullString{s: c.text(string(e.PreviousStatus)), valid: true}
		d.idempotencyKey = nullString{s: c.text(e.IdempotencyKey), valid: true}
		d.invoiceNumber, d.updatedAt = nullString{}, at
		g := &sagaRow{key: c.text(e.IdempotencyKey), dealID: c.uuid(e.DealID), state: "pending", startedAt: at, updatedAt: at}
		if _, ok := s.sagas[g.key]; ok {
			return unsupported(raw, "invoice saga inserted twice")
		}
		s.sagas[g.key] = g
		s.sagaOrder = append(s.sagaOrder, g)
	case domain.DealLost:
		d := s.deals[c.uuid(e.DealID)]
		if d == nil {
			return missing("deals")
		}
		d.status, d.version, d.updatedAt = string(domain.StatusLost), sv, at
		d.statusBeforeClose = nullString{s: c.text(string(e.PreviousStatus)), valid: true}
	case domain.InvoiceCreated:
		d := s.deals[c.uuid(e.DealID)]
		if d == nil {
			return missing("deals")
		}
		d.status, d.version, d.updatedAt = string(domain.StatusInvoiced), sv, at
		d.invoiceNumber = nullString{s: c.text(e.InvoiceNumber), valid: true}
		g := s.sagas[c.text(e.IdempotencyKey)]
		if g == nil {
			return missing("invoice_sagas")
		}
		g.state, g.invoiceNumber, g.nextAttempAt, g.updatedAt = "invoiced", d.invoiceNumber, nullTime{}, at
	case domain.InvoiceAttemptFailed:
		g := s.sagas[c.text(e.IdempotencyKey)]
		if g == nil {
			return missing("invoice_sagas")
		}
		attempted := c.time(e.AttemptedAt)
		g.state, g.version, g.attempts = "retrying", sv, c.int4(e.Attempt)
		g.errorClass = nullString{s: c.text(string(e.ErrorClass)), valid: true}
		g.lastError = nullString{s: c.text(e.Message), valid: true}
		if !g.firstAttemptAt.valid {
			g.firstAttemptAt = nullTime{t: attempted, valid: true}
		}
		g.lastAttemptAt = nullTime{t: attempted, valid: true}
		g.nextAttempAt = nullTime{}
		if !e.Final { // InvoiceFailed follows in the same transaction
			g.nextAttempAt = nullTime{t: c.time(e.NextAttemptAt), valid: true}
		}
		g.updatedAt = at
	case domain.InvoiceFailed:
		g := s.sagas[c.text(e.IdempotencyKey)]
		if g == nil {
			return missing("invoice_sagas")
		}
		g.state, g.version, g.attempts = "failed", sv, c.int4(e.Attempts)
		g.errorClass = nullString{s: c.text(string(e.ErrorClass)), valid: true}
		g.lastError = nullString{s: c.text(e.Reason), valid: true}
		g.nextAttempAt, g.updatedAt = nullTime{}, at
	case domain.DealReverted:
		d := s.deals[c.uuid(e.DealID)]
		if d == nil {
			return missing("deals")
		}
		d.status, d.version, d.updatedAt = string(domain.StatusReverted), sv, at
		g := s.sagas[c.text(e.IdempotencyKey)]
		if g == nil {
			return missing("invoice_sagas")
		}
		g.state, g.updatedAt = "compensated", at
	case domain.AlertRaised:
		a := &alertRow{id: c.uuid(e.AlertID), kind: c.text(e.Kind), severity: c.text(e.Severity), state: "open",
			dealID: c.nullUUID(e.DealID), key: c.nullText(e.IdempotencyKey), deadLetterID: c.nullUUID(e.DeadLetterID),
			message: c.text(e.Message), version: sv, createdAt: at, updatedAt: at}
		if _, ok := s.alerts[a.id]; ok {
			return unsupported(raw, "alert inserted twice")
		}
		s.alerts[a.id] = a
		s.alertOrder = append(s.alertOrder, a)
	case domain.MessageDeadLettered:
		md, err := json.Marshal(e.Metadata)
		if err != nil {
			return err
		}
		l := &deadLetterRow{id: c.uuid(e.DeadLetterID), state: "open", dealID: c.nullUUID(e.DealID), key: c.nullText(e.IdempotencyKey),
			messageUUID: c.text(e.MessageUUID), topic: c.text(e.Topic), handler: c.text(e.Handler), payload: c.bytes(e.RawPayload()),
			metadata: md, reason: c.text(e.Reason), errorClass: c.text(e.ErrorClass), attempts: c.int4(e.Attempts),
			firstFailureAt: c.time(e.FirstFailureAt), lastFailureAt: c.time(e.LastFailureAt), version: sv, createdAt: at, updatedAt: at}
		if _, ok := s.letters[l.id]; ok {
			return unsupported(raw, "dead letter inserted twice")
		}
		s.letters[l.id] = l
		s.letterOrder = append(s.letterOrder, l)
	case domain.InventorySet:
		sku := c.text(e.SKU)
		if v := s.inventory[sku]; v != nil {
			v.available, v.version, v.updatedAt = e.Available, sv, at
			break
		}
		v := &inventoryRow{sku: sku, available: e.Available, version: sv, updatedAt: at}
		s.inventory[sku] = v
		s.invOrder = append(s.invOrder, v)
	case domain.InventoryAllocated:
		v := s.inventory[c.text(e.SKU)]
		if v == nil {
			return missing("inventory")
		}
		v.available, v.allocated = c.subInt8(v.available, e.Quantity), c.addInt8(v.allocated, e.Quantity)
		v.version, v.updatedAt = sv, at
	case domain.InventoryReleased:
		v := s.inventory[c.text(e.SKU)]
		if v == nil {
			return missing("inventory")
		}
		v.available, v.allocated = c.addInt8(v.available, e.Quantity), c.subInt8(v.allocated, e.Quantity)
		v.version, v.updatedAt = sv, at
	case domain.DeadLetterEdited:
		l := s.letters[c.uuid(e.DeadLetterID)]
		if l == nil {
			return missing("dead_letters")
		}
		l.payload, l.revision, l.needsApproval = c.bytes([]byte(e.Payload)), c.int4(e.Revision), e.NeedsApproval
		l.approvedBy, l.version, l.updatedAt = nullString{}, sv, at
	case domain.DeadLetterApproved:
		l := s.letters[c.uuid(e.DeadLetterID)]
		if l == nil {
			return missing("dead_letters")
		}
		// Actor is a Go string, never NULL: "" is stored as "".
		l.approvedBy, l.version, l.updatedAt = nullString{s: c.text(e.Actor), valid: true}, sv, at
	case domain.DeadLetterReinjected:
		l := s.letters[c.uuid(e.DeadLetterID)]
		if l == nil {
			return missing("dead_letters")
		}
		l.state, l.reinjects = "reinjected", c.int4(e.Count)
		if k := c.nullText(e.IdempotencyKey); k.valid {
			l.key = k
		}
		l.version, l.updatedAt = sv, at
	case domain.DeadLetterDiscarded:
		l := s.letters[c.uuid(e.DeadLetterID)]
		if l == nil {
			return missing("dead_letters")
		}
		l.state, l.version, l.updatedAt = "discarded", sv, at
	case domain.DeadLetterResolved:
		l := s.letters[c.uuid(e.DeadLetterID)]
		if l == nil {
			return missing("dead_letters")
		}
		l.state, l.version, l.updatedAt = "resolved", sv, at
	case domain.DeadLetterReopened:
		l := s.letters[c.uuid(e.DeadLetterID)]
		if l == nil {
			return missing("dead_letters")
		}
		l.state, l.reason, l.errorClass = "open", c.text(e.Reason), c.text(e.ErrorClass)
		l.attempts = c.addInt4(l.attempts, int(c.int4(e.Attempts)))
		l.lastFailureAt, l.version, l.updatedAt = c.time(e.LastFailureAt), sv, at
	case domain.AlertAcknowledged:
		a := s.alerts[c.uuid(e.AlertID)]
		if a == nil {
			return missing("alerts")
		}
		a.state, a.version, a.updatedAt = "acknowledged", sv, at
	case domain.AlertResolved:
		a := s.alerts[c.uuid(e.AlertID)]
		if a == nil {
			return missing("alerts")
		}
		a.state, a.version, a.updatedAt = "resolved", sv, at
	case domain.DealReinstated:
		d := s.deals[c.uuid(e.DealID)]
		if d == nil {
			return missing("deals")
		}
		d.status, d.version = string(domain.StatusWon), sv
		d.idempotencyKey = nullString{s: c.text(e.IdempotencyKey), valid: true}
		d.invoiceNumber, d.updatedAt = nullString{}, at
	case domain.InvoiceSagaResumed:
		key, dealID := c.text(e.IdempotencyKey), c.uuid(e.DealID)
		if g := s.sagas[key]; g != nil {
			g.state, g.version, g.attempts = "pending", sv, 0
			g.errorClass, g.lastError, g.invoiceNumber = nullString{}, nullString{}, nullString{}
			g.firstAttemptAt, g.lastAttemptAt, g.nextAttempAt = nullTime{}, nullTime{}, nullTime{}
			g.updatedAt = at
			break
		}
		g := &sagaRow{key: key, dealID: dealID, state: "pending", version: sv, startedAt: at, updatedAt: at}
		s.sagas[key] = g
		s.sagaOrder = append(s.sagaOrder, g)
	default:
		return unsupported(raw, "no fold for event type %s", r.Event.EventType())
	}
	if c.problem != "" {
		return unsupported(raw, "%s", c.problem)
	}
	return nil
}

// COPY text format (https://www.postgresql.org/docs/current/sql-copy.html):
// columns separated by tabs, rows ended by newlines, \N for NULL, and
// backslash escapes for backslash, newline, carriage return and tab.

func appendEscaped[T string | []byte](b []byte, s T) []byte {
	for i := 0; i < len(s); i++ {
		switch ch := s[i]; ch {
		case '\\':
			b = append(b, '\\', '\\')
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, ch)
		}
	}
	return b
}

const copyNull = `\N`

func appendNullString(b []byte, s nullString) []byte {
	if !s.valid {
		return append(b, copyNull...)
	}
	return appendEscaped(b, s.s)
}

func appendNullUUID(b []byte, u nullUUIDValue) []byte {
	if !u.valid {
		return append(b, copyNull...)
	}
	return u.u.appendText(b)
}

func appendInt4(b []byte, v int32) []byte { return strconv.AppendInt(b, int64(v), 10) }

func appendNullInt4(b []byte, v nullInt4) []byte {
	if !v.valid {
		return append(b, copyNull...)
	}
	return appendInt4(b, v.v)
}

// appendTime writes a UTC time of years 1–9999 in microseconds (values.time).
func appendTime(b []byte, t time.Time) []byte {
	return t.AppendFormat(b, "2006-01-02 15:04:05.000000+00")
}

func appendNullTime(b []byte, t nullTime) []byte {
	if !t.valid {
		return append(b, copyNull...)
	}
	return appendTime(b, t.t)
}

// appendBytea writes bytea in hex format; the backslash is escaped for COPY.
func appendBytea(b []byte, v []byte) []byte {
	b = append(b, `\\x`...)
	return hex.AppendEncode(b, v)
}

func appendBool(b []byte, v bool) []byte {
	if v {
		return append(b, 't')
	}
	return append(b, 'f')
}

// copyTable is one table's COPY: its columns and a writer of row i.
type copyTable struct {
	name    string
	columns []string
	rows    int
	row     func(b []byte, i int) []byte
}

func concatRows[T any](states []*foldState, pick func(*foldState) []T) []T {
	var n int
	for _, s := range states {
		n += len(pick(s))
	}
	out := make([]T, 0, n)
	for _, s := range states {
		out = append(out, pick(s)...)
	}
	return out
}

// copyTables lists the COPYs that write the folded rows, every table's
// rows in the order they were inserted (partition by partition).
func copyTables(states []*foldState) []copyTable {
	deals := concatRows(states, func(s *foldState) []*dealRow { return s.dealOrder })
	inventory := concatRows(states, func(s *foldState) []*inventoryRow { return s.invOrder })
	sagas := concatRows(states, func(s *foldState) []*sagaRow { return s.sagaOrder })
	alerts := concatRows(states, func(s *foldState) []*alertRow { return s.alertOrder })
	letters := concatRows(states, func(s *foldState) []*deadLetterRow { return s.letterOrder })
	return []copyTable{
		{name: "deals", rows: len(deals), columns: []string{"id", "customer_id", "customer_name", "currency", "lines", "total", "status", "version",
			"close_version", "status_before_close", "idempotency_key", "invoice_number", "created_at", "updated_at"},
			row: func(b []byte, i int) []byte {
				d := deals[i]
				b = append(d.id.appendText(b), '\t')
				b = append(appendEscaped(b, d.customerID), '\t')
				b = append(appendEscaped(b, d.customerName), '\t')
				b = append(appendEscaped(b, d.currency), '\t')
				b = append(appendEscaped(b, d.lines), '\t')
				b = append(appendEscaped(b, d.total), '\t')
				b = append(appendEscaped(b, d.status), '\t')
				b = append(appendInt4(b, d.version), '\t')
				b = append(appendNullInt4(b, d.closeVersion), '\t')
				b = append(appendNullString(b, d.statusBeforeClose), '\t')
				b = append(appendNullString(b, d.idempotencyKey), '\t')
				b = append(appendNullString(b, d.invoiceNumber), '\t')
				b = append(appendTime(b, d.createdAt), '\t')
				return append(appendTime(b, d.updatedAt), '\n')
			}},
		{name: "inventory", rows: len(inventory), columns: []string{"sku", "available", "allocated", "version", "updated_at"},
			row: func(b []byte, i int) []byte {
				v := inventory[i]
				b = append(appendEscaped(b, v.sku), '\t')
				b = append(strconv.AppendInt(b, v.available, 10), '\t')
				b = append(strconv.AppendInt(b, v.allocated, 10), '\t')
				b = append(appendInt4(b, v.version), '\t')
				return append(appendTime(b, v.updatedAt), '\n')
			}},
		{name: "invoice_sagas", rows: len(sagas), columns: []string{"idempotency_key", "deal_id", "state", "invoice_number", "started_at", "updated_at",
			"version", "attempts", "error_class", "last_error", "first_attempt_at", "last_attempt_at", "next_attempt_at"},
			row: func(b []byte, i int) []byte {
				g := sagas[i]
				b = append(appendEscaped(b, g.key), '\t')
				b = append(g.dealID.appendText(b), '\t')
				b = append(appendEscaped(b, g.state), '\t')
				b = append(appendNullString(b, g.invoiceNumber), '\t')
				b = append(appendTime(b, g.startedAt), '\t')
				b = append(appendTime(b, g.updatedAt), '\t')
				b = append(appendInt4(b, g.version), '\t')
				b = append(appendInt4(b, g.attempts), '\t')
				b = append(appendNullString(b, g.errorClass), '\t')
				b = append(appendNullString(b, g.lastError), '\t')
				b = append(appendNullTime(b, g.firstAttemptAt), '\t')
				b = append(appendNullTime(b, g.lastAttemptAt), '\t')
				return append(appendNullTime(b, g.nextAttempAt), '\n')
			}},
		{name: "alerts", rows: len(alerts), columns: []string{"id", "kind", "severity", "state", "deal_id", "idempotency_key", "dead_letter_id",
			"message", "version", "created_at", "updated_at"},
			row: func(b []byte, i int) []byte {
				a := alerts[i]
				b = append(a.id.appendText(b), '\t')
				b = append(appendEscaped(b, a.kind), '\t')
				b = append(appendEscaped(b, a.severity), '\t')
				b = append(appendEscaped(b, a.state), '\t')
				b = append(appendNullUUID(b, a.dealID), '\t')
				b = append(appendNullString(b, a.key), '\t')
				b = append(appendNullUUID(b, a.deadLetterID), '\t')
				b = append(appendEscaped(b, a.message), '\t')
				b = append(appendInt4(b, a.version), '\t')
				b = append(appendTime(b, a.createdAt), '\t')
				return append(appendTime(b, a.updatedAt), '\n')
			}},
		{name: "dead_letters", rows: len(letters), columns: []string{"id", "state", "deal_id", "idempotency_key", "message_uuid", "topic", "handler",
			"payload", "metadata", "reason", "error_class", "attempts", "first_failure_at", "last_failure_at", "version", "created_at", "updated_at",
			"revision", "needs_approval", "approved_by", "reinjects"},
			row: func(b []byte, i int) []byte {
				l := letters[i]
				b = append(l.id.appendText(b), '\t')
				b = append(appendEscaped(b, l.state), '\t')
				b = append(appendNullUUID(b, l.dealID), '\t')
				b = append(appendNullString(b, l.key), '\t')
				b = append(appendEscaped(b, l.messageUUID), '\t')
				b = append(appendEscaped(b, l.topic), '\t')
				b = append(appendEscaped(b, l.handler), '\t')
				b = append(appendBytea(b, l.payload), '\t')
				b = append(appendEscaped(b, l.metadata), '\t')
				b = append(appendEscaped(b, l.reason), '\t')
				b = append(appendEscaped(b, l.errorClass), '\t')
				b = append(appendInt4(b, l.attempts), '\t')
				b = append(appendTime(b, l.firstFailureAt), '\t')
				b = append(appendTime(b, l.lastFailureAt), '\t')
				b = append(appendInt4(b, l.version), '\t')
				b = append(appendTime(b, l.createdAt), '\t')
				b = append(appendTime(b, l.updatedAt), '\t')
				b = append(appendInt4(b, l.revision), '\t')
				b = append(appendBool(b, l.needsApproval), '\t')
				b = append(appendNullString(b, l.approvedBy), '\t')
				return append(appendInt4(b, l.reinjects), '\n')
			}},
	}
}

// rowReader streams a copyTable's rows in COPY text format.
type rowReader struct {
	t        copyTable
	next     int
	buf      []byte
	consumed int
}

func (r *rowReader) Read(p []byte) (int, error) {
	for r.consumed == len(r.buf) {
		if r.next == r.t.rows {
			return 0, io.EOF
		}
		r.buf, r.consumed = r.buf[:0], 0
		for r.next < r.t.rows && len(r.buf) < 64<<10 {
			r.buf = r.t.row(r.buf, r.next)
			r.next++
		}
	}
	n := copy(p, r.buf[r.consumed:])
	r.consumed += n
	return n, nil
}

// copyOut writes t's rows into schema with COPY.
func copyOut(ctx context.Context, conn *pgx.Conn, schema string, t copyTable) error {
	if t.rows == 0 {
		return nil
	}
	cols := make([]string, len(t.columns))
	for i, c := range t.columns {
		cols[i] = pgx.Identifier{c}.Sanitize()
	}
	sql := `COPY ` + pgx.Identifier{schema, t.name}.Sanitize() + ` (` + strings.Join(cols, ", ") + `) FROM STDIN`
	tag, err := conn.PgConn().CopyFrom(ctx, &rowReader{t: t}, sql)
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("cannot copy into %s: %w", t.name, err)
	}
	if err != nil {
		return &foldUnsupported{reason: fmt.Sprintf("COPY into %s failed: %v", t.name, err)}
	}
	if tag.RowsAffected() != int64(t.rows) {
		return fmt.Errorf("COPY into %s wrote %d rows, not %d", t.name, tag.RowsAffected(), t.rows)
	}
	return nil
}
