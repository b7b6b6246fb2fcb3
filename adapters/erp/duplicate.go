package erp

import "errors"

// ErrDuplicateInvoice is wrapped (as ERPError.Err) by a Port whose ERP
// holds more than one invoice for one idempotency key: an ERP without a
// unique key (Tryton) after a race the service should have prevented. The
// error's class is permanent, but the invoice exists: callers should not
// compensate the deal; they should raise a duplicate_invoice alert and
// record one of the invoices (FindInvoiceByKey returns the oldest posted
// one). Test with errors.Is(err, erp.ErrDuplicateInvoice).
var ErrDuplicateInvoice = errors.New("the ERP holds more than one invoice for one idempotency key")
