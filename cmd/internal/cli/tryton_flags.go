package cli

import (
	"fmt"
	"os"
	"strings"

	"github.com/dealbridge/dealbridge/adapters/erp/tryton"
	"github.com/dealbridge/dealbridge/cmd/app"
)

// erpFlags select the ERP adapter (--erp) and configure Tryton. The Tryton
// password never comes from the command line: --tryton-password-file or
// $DEALBRIDGE_TRYTON_PASSWORD.
type erpFlags struct {
	kind            string
	url             string
	database        string
	user            string
	passwordFile    string
	customerMatch   string
	identifierType  string
	missingCustomer string
	productCode     string
}

func (e *erpFlags) register(f *flags) {
	f.string(&e.kind, "erp", "DEALBRIDGE_ERP", app.ERPHTTP, "ERP adapter: http (the generic HTTP/JSON API at --erp-url) or tryton (Tryton 6.0 JSON-RPC)")
	f.string(&e.url, "tryton-url", "DEALBRIDGE_TRYTON_URL", "http://127.0.0.1:8000", "Tryton server root (with --erp tryton)")
	f.string(&e.database, "tryton-database", "DEALBRIDGE_TRYTON_DATABASE", "", "Tryton database name")
	f.string(&e.user, "tryton-user", "DEALBRIDGE_TRYTON_USER", "", "Tryton login of the API user (needs the Account group, and Party Administration to create customers)")
	f.string(&e.passwordFile, "tryton-password-file", "DEALBRIDGE_TRYTON_PASSWORD_FILE", "", "file holding the Tryton password (or set $DEALBRIDGE_TRYTON_PASSWORD)")
	f.string(&e.customerMatch, "tryton-customer-match", "DEALBRIDGE_TRYTON_CUSTOMER_MATCH", string(tryton.MatchCode), "how a CRM customer id finds its Tryton party: code (party code) or identifier (a party identifier)")
	f.string(&e.identifierType, "tryton-identifier-type", "DEALBRIDGE_TRYTON_IDENTIFIER_TYPE", "", "with --tryton-customer-match identifier: only identifiers of this type")
	f.string(&e.missingCustomer, "tryton-missing-customer", "DEALBRIDGE_TRYTON_MISSING_CUSTOMER", string(tryton.RejectMissing), "a customer Tryton does not know: reject (dead letter) or create")
	f.string(&e.productCode, "tryton-product-code", "DEALBRIDGE_TRYTON_PRODUCT_CODE", "", "product code of every invoice line (empty: each line's SKU is its product code)")
}

// apply puts the ERP selection into cfg.
func (e *erpFlags) apply(env Env, cfg *app.HandlerConfig) error {
	cfg.ERP = e.kind
	switch e.kind {
	case app.ERPHTTP:
		return nil
	case app.ERPTryton:
	default:
		return &usageError{msg: fmt.Sprintf("--erp must be %s or %s", app.ERPHTTP, app.ERPTryton)}
	}
	password := env.Getenv("DEALBRIDGE_TRYTON_PASSWORD")
	if e.passwordFile != "" {
		b, err := os.ReadFile(e.passwordFile)
		if err != nil {
			return fmt.Errorf("cannot read the Tryton password: %w", err)
		}
		password = strings.TrimSpace(string(b))
	}
	cfg.Tryton = tryton.Config{
		URL: e.url, Database: e.database, User: e.user, Password: password,
		CustomerMatch: tryton.CustomerMatch(e.customerMatch), IdentifierType: e.identifierType,
		MissingCustomer: tryton.MissingCustomer(e.missingCustomer), ProductCode: e.productCode,
	}
	if err := cfg.Tryton.Validate(); err != nil {
		return &usageError{msg: "--erp tryton: " + strings.ReplaceAll(err.Error(), "\n", "; ") +
			" (set --tryton-url, --tryton-database, --tryton-user and --tryton-password-file or $DEALBRIDGE_TRYTON_PASSWORD)"}
	}
	return nil
}
