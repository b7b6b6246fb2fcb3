package cli

import (
	"context"
	"fmt"
)

// runAudit dispatches the audit subcommands: verify (the event log's hash
// chain, audit_verify.go) and list (the operator audit log, audit_list.go).
func runAudit(ctx context.Context, env Env, args []string) error {
	usage := "expected: audit verify [flags] | audit list [flags]"
	if len(args) == 0 {
		return &usageError{msg: usage}
	}
	switch args[0] {
	case "verify":
		return runAuditVerify(ctx, env, args[1:])
	case "list":
		return runAuditList(ctx, env, args[1:])
	case "-h", "--help", "help":
		fmt.Fprintln(env.Stderr, "Usage: dealbridge audit verify [flags]   check the event log's hash chain")
		fmt.Fprintln(env.Stderr, "       dealbridge audit list [flags]     the audit log of operator actions")
		return nil
	}
	return &usageError{msg: fmt.Sprintf("unknown audit subcommand %q; %s", args[0], usage)}
}
