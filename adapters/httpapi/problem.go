package httpapi

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/dealbridge/dealbridge/domain"
)

// Problem is an RFC 9457 problem details body.
type Problem struct {
	Type     string `json:"type"`
	Title    string `json:"title"`
	Status   int    `json:"status"`
	Detail   string `json:"detail,omitempty"`
	Field    string `json:"field,omitempty"`
	Instance string `json:"instance,omitempty"`
}

func writeProblem(w http.ResponseWriter, r *http.Request, p Problem) {
	if p.Type == "" {
		p.Type = "about:blank"
	}
	if p.Title == "" {
		p.Title = http.StatusText(p.Status)
	}
	p.Instance = r.URL.Path
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(p.Status)
	_ = json.NewEncoder(w).Encode(p)
}

// problemFor maps a command error to its problem. Unknown errors are 500s
// whose detail does not leak internals.
func problemFor(err error) Problem {
	var (
		verr *domain.ValidationError
		terr *domain.TransitionError
		serr *domain.InsufficientStockError
		berr *badRequest
	)
	switch {
	case errors.As(err, &berr):
		st := cmp.Or(berr.status, http.StatusBadRequest)
		return Problem{Status: st, Title: "Malformed request", Detail: berr.msg, Field: berr.field,
			Type: "https://dealbridge.dev/problems/malformed-request"}
	case errors.As(err, &verr):
		return Problem{Status: http.StatusUnprocessableEntity, Title: "Validation failed", Detail: verr.Error(), Field: verr.Field,
			Type: "https://dealbridge.dev/problems/validation"}
	case errors.Is(err, domain.ErrNotFound):
		return Problem{Status: http.StatusNotFound, Title: "Not found", Detail: err.Error(),
			Type: "https://dealbridge.dev/problems/not-found"}
	case errors.As(err, &serr):
		return Problem{Status: http.StatusConflict, Title: "Insufficient stock", Detail: serr.Error(), Field: "lines",
			Type: "https://dealbridge.dev/problems/insufficient-stock"}
	case errors.As(err, &terr):
		return Problem{Status: http.StatusConflict, Title: "Illegal transition", Detail: terr.Error(), Field: "status",
			Type: "https://dealbridge.dev/problems/illegal-transition"}
	case errors.Is(err, domain.ErrSelfApproval):
		return Problem{Status: http.StatusForbidden, Title: "Self-approval refused", Detail: err.Error(), Field: "actor",
			Type: "https://dealbridge.dev/problems/self-approval"}
	case errors.Is(err, domain.ErrApprovalRequired):
		return Problem{Status: http.StatusConflict, Title: "Approval required", Detail: err.Error(),
			Type: "https://dealbridge.dev/problems/approval-required"}
	case errors.Is(err, domain.ErrReinjectLimit):
		return Problem{Status: http.StatusConflict, Title: "Re-inject limit reached", Detail: err.Error(),
			Type: "https://dealbridge.dev/problems/reinject-limit"}
	case errors.Is(err, domain.ErrStateConflict):
		return Problem{Status: http.StatusConflict, Title: "State conflict", Detail: err.Error(), Field: "state",
			Type: "https://dealbridge.dev/problems/state-conflict"}
	case errors.Is(err, domain.ErrVersionConflict):
		return Problem{Status: http.StatusConflict, Title: "Version conflict", Detail: err.Error(), Field: "version",
			Type: "https://dealbridge.dev/problems/version-conflict"}
	}
	return Problem{Status: http.StatusInternalServerError, Title: "Internal error", Detail: "the request failed; see the server log"}
}

type badRequest struct {
	field, msg string
	status     int // 0: 400
}

func (e *badRequest) Error() string { return e.msg }

const maxBody = 1 << 20

// decode reads exactly one JSON object into v, refusing unknown fields,
// trailing data and bodies over 1 MiB, with an error naming the field.
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	// The Content-Type is not checked: CRMs and curl -d send JSON labelled
	// as a form, and the body is parsed strictly as JSON either way.
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var (
			syn *json.SyntaxError
			typ *json.UnmarshalTypeError
			mbe *http.MaxBytesError
		)
		switch {
		case errors.Is(err, io.EOF):
			return &badRequest{msg: "request body is empty"}
		case errors.As(err, &syn):
			return &badRequest{msg: fmt.Sprintf("malformed JSON at byte %d: %v", syn.Offset, err)}
		case errors.As(err, &typ):
			return &badRequest{field: typ.Field, msg: fmt.Sprintf("field %q must be %s, not %s", typ.Field, typeName(typ), typ.Value)}
		case errors.As(err, &mbe):
			return &badRequest{status: http.StatusRequestEntityTooLarge, msg: fmt.Sprintf("request body is larger than %d bytes", maxBody)}
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			f := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
			return &badRequest{field: f, msg: fmt.Sprintf("unknown field %q", f)}
		default:
			return &badRequest{msg: fmt.Sprintf("malformed JSON: %v", err)}
		}
	}
	if dec.More() {
		return &badRequest{msg: "request body must hold exactly one JSON object"}
	}
	return nil
}

func typeName(e *json.UnmarshalTypeError) string {
	if e.Type.Kind().String() == "string" {
		return "a string (amounts are decimal strings such as \"495.00\")"
	}
	return "a " + e.Type.String()
}
