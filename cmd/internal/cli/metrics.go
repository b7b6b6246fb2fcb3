package cli

import (
	"fmt"
	"net"
)

// metricsFlags is --metrics-listen: the address of a metrics-only HTTP
// listener (GET /metrics, GET /healthz), off when empty.
type metricsFlags struct {
	listen string
}

func (m *metricsFlags) register(f *flags, help string) {
	f.string(&m.listen, "metrics-listen", "DEALBRIDGE_METRICS_LISTEN", "", help)
}

// bind listens on --metrics-listen; nil when it is off. Binding before
// anything starts makes a port in use one clear error.
func (m *metricsFlags) bind() (net.Listener, error) {
	if m.listen == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", m.listen)
	if err != nil {
		return nil, fmt.Errorf("cannot listen on %s (--metrics-listen): %w", m.listen, err)
	}
	return ln, nil
}
