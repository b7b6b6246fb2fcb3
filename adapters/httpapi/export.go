package httpapi

// ProblemFor maps a command error to the problem the API answers with, so
// that other HTTP layers (the dashboard) report errors the same way.
func ProblemFor(err error) Problem { return problemFor(err) }
