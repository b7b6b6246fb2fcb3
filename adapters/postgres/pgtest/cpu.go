package pgtest

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// BackendPIDs opens every connection of pool and returns the server
// processes serving them, for BackendsCPU. Benchmarks use it to split
// their CPU between this process and Postgres.
func BackendPIDs(tb testing.TB, pool *pgxpool.Pool) []int {
	tb.Helper()
	var conns []*pgxpool.Conn
	defer func() {
		for _, c := range conns {
			c.Release()
		}
	}()
	var pids []int
	for range pool.Config().MaxConns {
		c, err := pool.Acquire(tb.Context())
		if err != nil {
			tb.Fatal(err)
		}
		conns = append(conns, c)
		pids = append(pids, int(c.Conn().PgConn().PID()))
	}
	return pids
}

// BackendsCPU is the CPU time the processes pids have used (0 for those
// this machine does not show: a server elsewhere).
func BackendsCPU(pids []int) time.Duration {
	var total time.Duration
	for _, pid := range pids {
		stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			continue
		}
		f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
		// utime and stime are the 14th and 15th fields of the line, f[11]
		// and f[12] after the command.
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		total += time.Duration(u+s) * time.Second / 100 // clock ticks (USER_HZ = 100)
	}
	return total
}

// ProcessCPU is the CPU time this process has used.
func ProcessCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
