package tryton

import (
	"context"
	"fmt"
	"strings"

	"github.com/shopspring/decimal"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/domain"
)

// invoiceFields are read from account.invoice.
var invoiceFields = []any{"id", "number", "reference", "state", "party", "currency",
	"untaxed_amount", "total_amount", "create_date"}

type invoiceRow struct {
	ID            int64     `json:"id"`
	Number        tString   `json:"number"`
	Reference     tString   `json:"reference"`
	State         string    `json:"state"`
	Party         tID       `json:"party"`
	Currency      tID       `json:"currency"`
	UntaxedAmount tDecimal  `json:"untaxed_amount"`
	TotalAmount   tDecimal  `json:"total_amount"`
	CreateDate    tDateTime `json:"create_date"`
}

func permanent(format string, args ...any) error {
	return &domain.ERPError{Class: domain.ErrorPermanent, Message: "tryton: " + fmt.Sprintf(format, args...)}
}

// CreateInvoice invoices req in Tryton: one posted customer invoice whose
// reference is req.Key, created unless one exists (see the package
// documentation for the state machine). The caller serialises calls per
// deal; calls for one key are also serialised within this Client.
func (c *Client) CreateInvoice(ctx context.Context, req erp.InvoiceRequest) (erp.Invoice, error) {
	if err := checkRequest(req); err != nil {
		return erp.Invoice{}, err
	}
	unlock, err := c.keys.lock(ctx, req.Key)
	if err != nil {
		return erp.Invoice{}, &domain.ERPError{Class: domain.ErrorTransient, Message: "tryton: waiting for another call on key " + req.Key, Err: err}
	}
	defer unlock()
	log := c.log.With("key", req.Key, "reference", req.Reference)

	found, err := c.searchInvoices(ctx, req.Key)
	if err != nil {
		return erp.Invoice{}, err
	}
	var id int64
	switch {
	case len(found) > 1:
		return erp.Invoice{}, c.duplicate(ctx, req.Key, found)
	case len(found) == 1 && (found[0].State == "posted" || found[0].State == "paid"):
		log.DebugContext(ctx, "tryton invoice already posted", "number", found[0].Number)
		return c.toInvoice(ctx, found[0], req.CustomerID)
	case len(found) == 1:
		inv := found[0]
		ok, why, err := c.draftMatches(ctx, inv, req)
		if err != nil {
			return erp.Invoice{}, err
		}
		if ok || inv.State != "draft" {
			log.InfoContext(ctx, "tryton invoice found unposted; posting it", "id", inv.ID, "state", inv.State)
			id = inv.ID
			break
		}
		// The request changed since the draft was made (a dead letter
		// edited and re-injected): replace the draft.
		log.InfoContext(ctx, "tryton draft invoice differs from the request; replacing it", "id", inv.ID, "why", why)
		if err := c.call(ctx, "model.account.invoice.delete", []any{[]any{inv.ID}}, nil, write); err != nil {
			return erp.Invoice{}, err
		}
	}
	if id == 0 {
		values, err := c.invoiceValues(ctx, req)
		if err != nil {
			return erp.Invoice{}, err
		}
		var ids []int64
		if err := c.call(ctx, "model.account.invoice.create", []any{[]any{values}}, &ids, write); err != nil {
			return erp.Invoice{}, err
		}
		if len(ids) != 1 {
			return erp.Invoice{}, &domain.ERPError{Class: domain.ErrorAmbiguous, Message: fmt.Sprintf("tryton: create returned %d ids", len(ids))}
		}
		id = ids[0]
		log.DebugContext(ctx, "tryton draft invoice created", "id", id)
	}
	// Posting numbers the invoice, sets invoice_date to today and books
	// the move; posting a posted invoice is a no-op. Posts take the strict
	// invoice sequence's row lock (NOWAIT): concurrent posts fail with a
	// lock error, so this client posts one at a time.
	select {
	case c.postSem <- struct{}{}:
	case <-ctx.Done():
		return erp.Invoice{}, &domain.ERPError{Class: domain.ErrorTransient, Message: "tryton: waiting to post", Err: ctx.Err()}
	}
	err = c.call(ctx, "model.account.invoice.post", []any{[]any{id}}, nil, write)
	<-c.postSem
	if err != nil {
		return erp.Invoice{}, err
	}
	var rows []invoiceRow
	if err := c.call(ctx, "model.account.invoice.read", []any{[]any{id}, invoiceFields}, &rows, read); err != nil {
		// Posted (the post call answered) but unread: the saga looks it
		// up by key.
		return erp.Invoice{}, asAmbiguous(err)
	}
	if len(rows) != 1 || (rows[0].State != "posted" && rows[0].State != "paid") || rows[0].Number == "" {
		return erp.Invoice{}, &domain.ERPError{Class: domain.ErrorAmbiguous, Message: fmt.Sprintf("tryton: invoice %d not posted after post: %+v", id, rows)}
	}
	inv := rows[0]
	if want, err := decimal.NewFromString(req.Total); err == nil && !inv.UntaxedAmount.Equal(want) {
		log.WarnContext(ctx, "tryton invoice amount differs from the deal total", "untaxed", inv.UntaxedAmount.String(), "deal_total", req.Total)
	}
	log.InfoContext(ctx, "tryton invoice posted", "id", id, "number", inv.Number, "total", inv.TotalAmount.String())
	return c.toInvoice(ctx, inv, req.CustomerID)
}

// FindInvoiceByKey returns the posted (or paid) invoice whose reference is
// key. A draft is not reported: it has no number yet, and CreateInvoice
// posts it. With several invoices for key it returns the oldest posted one
// and logs an error; the others are named in the result's Duplicates.
func (c *Client) FindInvoiceByKey(ctx context.Context, key string) (erp.Invoice, bool, error) {
	if key == "" {
		return erp.Invoice{}, false, permanent("empty idempotency key")
	}
	found, err := c.searchInvoices(ctx, key)
	if err != nil {
		return erp.Invoice{}, false, err
	}
	if len(found) > 1 {
		c.log.ErrorContext(ctx, "tryton holds more than one invoice for one key", "key", key, "invoices", describe(found))
	}
	for i, inv := range found { // ordered by id
		if inv.State == "posted" || inv.State == "paid" {
			out, err := c.toInvoice(ctx, inv, "")
			if err == nil && len(found) > 1 {
				out.Duplicates = describeEach(append(found[:i:i], found[i+1:]...))
			}
			return out, err == nil, err
		}
	}
	return erp.Invoice{}, false, nil
}

func checkRequest(req erp.InvoiceRequest) error {
	switch {
	case req.Key == "":
		return permanent("empty idempotency key")
	case len(req.Lines) == 0:
		return permanent("invoice request %s has no lines", req.Key)
	case req.Currency == "":
		return permanent("invoice request %s has no currency", req.Key)
	case req.CustomerID == "":
		return permanent("invoice request %s has no customer id", req.Key)
	}
	for i, l := range req.Lines {
		if _, err := decimal.NewFromString(l.UnitPrice); err != nil {
			return permanent("line %d: unit price %q is not a decimal", i+1, l.UnitPrice)
		}
	}
	return nil
}

// searchInvoices returns the customer invoices (not cancelled) whose
// reference is key, oldest first.
func (c *Client) searchInvoices(ctx context.Context, key string) ([]invoiceRow, error) {
	var rows []invoiceRow
	domainArg := []any{
		[]any{"reference", "=", key},
		[]any{"type", "=", "out"},
		[]any{"state", "!=", "cancelled"},
	}
	err := c.call(ctx, "model.account.invoice.search_read",
		[]any{domainArg, 0, nil, []any{[]any{"id", "ASC"}}, invoiceFields}, &rows, read)
	return rows, err
}

func (c *Client) duplicate(ctx context.Context, key string, found []invoiceRow) error {
	d := describe(found)
	c.log.ErrorContext(ctx, "tryton holds more than one invoice for one key", "key", key, "invoices", d)
	return &domain.ERPError{Class: domain.ErrorPermanent,
		Message: fmt.Sprintf("tryton: duplicate invoice: %d invoices have reference %s (%s); cancel or credit all but one in Tryton",
			len(found), key, d),
		Err: erp.ErrDuplicateInvoice}
}

func describe(found []invoiceRow) string { return strings.Join(describeEach(found), ", ") }

func describeEach(found []invoiceRow) []string {
	parts := make([]string, len(found))
	for i, f := range found {
		n := string(f.Number)
		if n == "" {
			n = "no number"
		}
		parts[i] = fmt.Sprintf("id %d %s %s", f.ID, f.State, n)
	}
	return parts
}

// draftMatches reports whether an unposted invoice found for the key was
// made from an equivalent request (same party, currency and amount).
func (c *Client) draftMatches(ctx context.Context, inv invoiceRow, req erp.InvoiceRequest) (bool, string, error) {
	party, err := c.lookupParty(ctx, req.CustomerID)
	if err != nil {
		return false, "", err
	}
	cur, err := c.currencyID(ctx, req.Currency)
	if err != nil {
		return false, "", err
	}
	total, _ := decimal.NewFromString(req.Total)
	switch {
	case party == 0 || int64(inv.Party) != party:
		return false, "customer changed", nil
	case int64(inv.Currency) != cur:
		return false, "currency changed", nil
	case req.Total != "" && !inv.UntaxedAmount.Equal(total):
		return false, fmt.Sprintf("amount changed (%s → %s)", inv.UntaxedAmount.String(), req.Total), nil
	}
	return true, "", nil
}

// invoiceValues builds the create values of a customer invoice for req.
// Required fields Tryton would fill in its UI (invoice address, receivable
// account, journal, payment term; the line's account and unit) come from
// on_change/on_change_with, as the client would get them: nothing depends
// on one database's ids.
func (c *Client) invoiceValues(ctx context.Context, req erp.InvoiceRequest) (map[string]any, error) {
	company, _, err := c.company(ctx)
	if err != nil {
		return nil, err
	}
	party, err := c.party(ctx, req)
	if err != nil {
		return nil, err
	}
	currency, err := c.currencyID(ctx, req.Currency)
	if err != nil {
		return nil, err
	}
	// The company goes into the values too: the receivable account
	// depends on the record's company, not the context's.
	head := map[string]any{"company": company, "party": party, "type": "out", "currency": currency}
	var changes []map[string]any
	if err := c.call(ctx, "model.account.invoice.on_change", []any{head, []any{"party", "type"}}, &changes, read); err != nil {
		return nil, err
	}
	values := map[string]any{
		"company": company, "party": party, "type": "out", "currency": currency,
		"reference":   req.Key,
		"description": truncate(fmt.Sprintf("CRM deal %s (%s)", req.Reference, req.CustomerName)),
	}
	for _, ch := range changes {
		for _, f := range []string{"invoice_address", "journal", "payment_term"} {
			if id, ok := idOf(ch[f]); ok {
				values[f] = id
			}
		}
	}
	withAccount := map[string]any{"company": company, "party": party, "type": "out"}
	var acc map[string]any
	if err := c.call(ctx, "model.account.invoice.on_change_with", []any{withAccount, []any{"account"}}, &acc, read); err != nil {
		return nil, err
	}
	if id, ok := idOf(acc["account"]); ok {
		values["account"] = id
	}
	if _, ok := values["account"]; !ok {
		return nil, permanent("no receivable account for customer %s: set the party's or the accounting configuration's default receivable account", req.CustomerID)
	}
	if _, ok := values["journal"]; !ok {
		return nil, permanent("no revenue journal found for customer invoices: create a journal of type revenue")
	}
	// invoice_address left out when missing: Tryton then refuses the
	// create with its own message ("A value is required for field
	// Invoice Address"), kept in the dead letter.

	lines := make([]map[string]any, 0, len(req.Lines))
	products := map[string]int64{}
	for i, l := range req.Lines {
		code := c.cfg.ProductCode
		if code == "" {
			code = l.SKU
		}
		product, ok := products[code]
		if !ok {
			if product, err = c.productID(ctx, code); err != nil {
				return nil, err
			}
			products[code] = product
		}
		line := map[string]any{"company": company, "product": product, "type": "line", "invoice_type": "out",
			"party": party, "quantity": l.Quantity, "currency": currency}
		var lch []map[string]any
		if err := c.call(ctx, "model.account.invoice.line.on_change", []any{line, []any{"product"}}, &lch, read); err != nil {
			return nil, err
		}
		price, _ := decimal.NewFromString(l.UnitPrice)
		desc := l.Description
		if c.cfg.ProductCode != "" && l.SKU != "" {
			desc = strings.TrimSpace(l.SKU + " " + desc)
		}
		v := map[string]any{"type": "line", "company": company, "currency": currency, "product": product, "quantity": l.Quantity,
			"unit_price": decimalValue(price), "description": desc}
		for _, ch := range lch {
			for _, f := range []string{"account", "unit"} {
				if id, ok := idOf(ch[f]); ok {
					v[f] = id
				}
			}
			if taxes := idsOf(ch["taxes"]); len(taxes) > 0 {
				ids := make([]any, len(taxes))
				for j, t := range taxes {
					ids[j] = t
				}
				v["taxes"] = []any{[]any{"add", ids}}
			}
		}
		if _, ok := v["account"]; !ok {
			return nil, permanent("line %d: product %s has no revenue account: set one on its account category", i+1, code)
		}
		lines = append(lines, v)
	}
	values["lines"] = one2ManyCreate(lines...)
	return values, nil
}

// party returns the party of req's customer, creating it when configured.
func (c *Client) party(ctx context.Context, req erp.InvoiceRequest) (int64, error) {
	id, err := c.lookupParty(ctx, req.CustomerID)
	if err != nil || id != 0 {
		return id, err
	}
	if c.cfg.MissingCustomer != CreateMissing {
		how := "code"
		if c.cfg.CustomerMatch == MatchIdentifier {
			how = "identifier"
		}
		return 0, permanent("unknown customer: no party with %s %q (customer %q); create it in Tryton, or fix the deal's customer id and re-inject",
			how, req.CustomerID, req.CustomerName)
	}
	// Serialise creations of one customer within this process; across
	// processes a unique party code makes a racing create fail, and the
	// lookup below finds the winner.
	unlock, err := c.keys.lock(ctx, "customer\x00"+req.CustomerID)
	if err != nil {
		return 0, &domain.ERPError{Class: domain.ErrorTransient, Message: "tryton: waiting to create customer " + req.CustomerID, Err: err}
	}
	defer unlock()
	if id, err := c.lookupParty(ctx, req.CustomerID); err != nil || id != 0 {
		return id, err
	}
	name := req.CustomerName
	if name == "" {
		name = req.CustomerID
	}
	values := map[string]any{"name": name, "addresses": one2ManyCreate(map[string]any{})}
	if c.cfg.CustomerMatch == MatchIdentifier {
		ident := map[string]any{"code": req.CustomerID}
		if c.cfg.IdentifierType != "" {
			ident["type"] = c.cfg.IdentifierType
		}
		values["identifiers"] = one2ManyCreate(ident)
	} else {
		values["code"] = req.CustomerID
	}
	var ids []int64
	if err := c.call(ctx, "model.party.party.create", []any{[]any{values}}, &ids, write); err != nil {
		if again, lerr := c.lookupParty(ctx, req.CustomerID); lerr == nil && again != 0 {
			return again, nil
		}
		return 0, err
	}
	if len(ids) != 1 {
		return 0, &domain.ERPError{Class: domain.ErrorTransient, Message: fmt.Sprintf("tryton: party create returned %d ids", len(ids))}
	}
	c.log.InfoContext(ctx, "tryton customer created", "customer", req.CustomerID, "party", ids[0])
	return ids[0], nil
}

// lookupParty returns the party mapped to the CRM customer id, or 0.
func (c *Client) lookupParty(ctx context.Context, customerID string) (int64, error) {
	var rows []struct {
		ID    int64 `json:"id"`
		Party tID   `json:"party"`
	}
	var err error
	if c.cfg.CustomerMatch == MatchIdentifier {
		dom := []any{[]any{"code", "=", customerID}}
		if c.cfg.IdentifierType != "" {
			dom = append(dom, []any{"type", "=", c.cfg.IdentifierType})
		}
		err = c.call(ctx, "model.party.identifier.search_read", []any{dom, 0, 2, nil, []any{"party"}}, &rows, read)
		for i := range rows {
			rows[i].ID = int64(rows[i].Party)
		}
	} else {
		err = c.call(ctx, "model.party.party.search_read",
			[]any{[]any{[]any{"code", "=", customerID}}, 0, 2, nil, []any{"id"}}, &rows, read)
	}
	if err != nil {
		return 0, err
	}
	switch len(rows) {
	case 0:
		return 0, nil
	case 1:
		return rows[0].ID, nil
	}
	return 0, permanent("customer id %q matches more than one party (%s): make the mapping unique", customerID, c.cfg.CustomerMatch)
}

func (c *Client) productID(ctx context.Context, code string) (int64, error) {
	var rows []struct {
		ID int64 `json:"id"`
	}
	if err := c.call(ctx, "model.product.product.search_read",
		[]any{[]any{[]any{"code", "=", code}}, 0, 2, nil, []any{"id"}}, &rows, read); err != nil {
		return 0, err
	}
	switch len(rows) {
	case 0:
		return 0, permanent("unknown product: no product with code %q; create it in Tryton or fix the SKU", code)
	case 1:
		return rows[0].ID, nil
	}
	return 0, permanent("product code %q matches more than one product", code)
}

// currencyID returns the id of the ISO code (cached: currencies do not
// change ids).
func (c *Client) currencyID(ctx context.Context, code string) (int64, error) {
	c.curMu.Lock()
	id, ok := c.currencies[code]
	c.curMu.Unlock()
	if ok {
		return id, nil
	}
	var rows []struct {
		ID int64 `json:"id"`
	}
	if err := c.call(ctx, "model.currency.currency.search_read",
		[]any{[]any{[]any{"code", "=", code}}, 0, 1, nil, []any{"id"}}, &rows, read); err != nil {
		return 0, err
	}
	if len(rows) == 0 {
		return 0, permanent("unknown currency %q: activate it in Tryton", code)
	}
	c.curMu.Lock()
	c.currencies[code], c.curCodes[rows[0].ID] = rows[0].ID, code
	c.curMu.Unlock()
	return rows[0].ID, nil
}

func (c *Client) currencyCode(ctx context.Context, id int64) (string, error) {
	c.curMu.Lock()
	code, ok := c.curCodes[id]
	c.curMu.Unlock()
	if ok || id == 0 {
		return code, nil
	}
	var rows []struct {
		ID   int64   `json:"id"`
		Code tString `json:"code"`
	}
	if err := c.call(ctx, "model.currency.currency.read", []any{[]any{id}, []any{"code"}}, &rows, read); err != nil {
		return "", err
	}
	if len(rows) != 1 {
		return "", &domain.ERPError{Class: domain.ErrorTransient, Message: fmt.Sprintf("tryton: currency %d not readable", id)}
	}
	code = string(rows[0].Code)
	c.curMu.Lock()
	c.currencies[code], c.curCodes[id] = id, code
	c.curMu.Unlock()
	return code, nil
}

// toInvoice converts a posted invoice. customerID is the CRM id when
// known; otherwise the party's code is read.
func (c *Client) toInvoice(ctx context.Context, inv invoiceRow, customerID string) (erp.Invoice, error) {
	cur, err := c.currencyCode(ctx, int64(inv.Currency))
	if err != nil {
		return erp.Invoice{}, err
	}
	if customerID == "" && inv.Party != 0 && c.cfg.CustomerMatch == MatchCode {
		var rows []struct {
			Code tString `json:"code"`
		}
		if err := c.call(ctx, "model.party.party.read", []any{[]any{int64(inv.Party)}, []any{"code"}}, &rows, read); err != nil {
			return erp.Invoice{}, err
		}
		if len(rows) == 1 {
			customerID = string(rows[0].Code)
		}
	}
	key := string(inv.Reference)
	return erp.Invoice{
		Number: string(inv.Number), Key: key, Reference: dealID(key), CustomerID: customerID,
		Currency: cur, Total: inv.TotalAmount.StringFixed(2), Status: inv.State, CreatedAt: inv.CreateDate.Time,
	}, nil
}

// dealID is the deal id inside K ("<deal>:<close version>[:r<n>]").
func dealID(key string) string {
	parts := strings.Split(key, ":")
	if len(parts) >= 2 {
		if len(parts) >= 3 && strings.HasPrefix(parts[len(parts)-1], "r") {
			return strings.Join(parts[:len(parts)-2], ":")
		}
		return strings.Join(parts[:len(parts)-1], ":")
	}
	return key
}

// asAmbiguous turns a failed read after a write into an ambiguous outcome:
// the write happened, its result is unknown.
func asAmbiguous(err error) error {
	if e, ok := err.(*domain.ERPError); ok && e.Class != domain.ErrorPermanent {
		cp := *e
		cp.Class = domain.ErrorAmbiguous
		return &cp
	}
	return err
}
