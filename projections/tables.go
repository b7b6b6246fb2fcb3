package projections

// Tables lists every table that Apply writes, parents before children (the
// order a swap copies them in). A replay creates these, and only these, in
// its shadow schema and runs Apply with search_path set to that schema
// alone, so a projection writing a table missing here fails the replay
// loudly ("relation does not exist") instead of drifting silently.
//
// Add a row for every new projection table. Tables that are not pure
// functions of the event log (audit_log, work_queue, outbox, settings, …)
// do not belong here.
//
// Two rules keep a replay equal to live (rebuild.go):
//   - a projection writes only values derived from its event (timestamps
//     from RecordedAt, never now(), ids from the payload, never a sequence);
//   - it writes only rows owned by its event's stream (see partitionOf: a
//     deal's rows for deal and invoice-saga streams, the SKU's row for an
//     inventory stream, the alert's or dead letter's own row), because a
//     replay folds different owners in parallel. A projection that must
//     write across owners (a global counter) needs partitionOf changed.
func Tables() []string {
	return []string{
		"deals",
		"inventory",
		"invoice_sagas",
		"alerts",
		"dead_letters",
	}
}
