// Package pgcluster runs a private PostgreSQL cluster from the server
// binaries installed on the machine (initdb + pg_ctl), for `dealbridge dev`
// and for tests. A cluster lives in a directory of its own, listens only on
// 127.0.0.1 and keeps its data and port across runs.
//
// PostgreSQL refuses to run as root, so when the calling process is root the
// server binaries run as Config.RunAsUser (default "postgres").
package pgcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Superuser is the cluster's superuser; connections need no password
// (trust authentication on the loopback interface).
const Superuser = "postgres"

// Files inside Config.DataDir.
const (
	pgdataName  = "pgdata"       // the PostgreSQL data directory
	portName    = "port"         // the port chosen on the first run
	logFileName = "postgres.log" // server log (pg_ctl -l)
)

const (
	startTimeout = 60 * time.Second // pg_ctl -t
	logTailLines = 30
)

// StopMode is a pg_ctl shutdown mode.
type StopMode int

const (
	// StopFast rolls back open transactions, disconnects clients and shuts
	// down cleanly.
	StopFast StopMode = iota
	// StopSmart waits for every client to disconnect first.
	StopSmart
	// StopImmediate aborts every server process without a clean shutdown,
	// like a crash: the next start runs crash recovery.
	StopImmediate
)

// String returns the pg_ctl -m name of the mode.
func (m StopMode) String() string {
	switch m {
	case StopSmart:
		return "smart"
	case StopFast:
		return "fast"
	case StopImmediate:
		return "immediate"
	default:
		return "StopMode(" + strconv.Itoa(int(m)) + ")"
	}
}

// Config describes a private cluster.
type Config struct {
	// DataDir holds the cluster (DataDir/pgdata), its server log
	// (DataDir/postgres.log) and its port (DataDir/port). It is created if
	// absent and reused if it already holds a cluster. Required.
	DataDir string
	// Port is the loopback port to listen on. 0 reuses the port recorded in
	// DataDir by a previous run, or else picks a free one and records it.
	Port int
	// BinDir holds initdb, pg_ctl and postgres. Empty: discover it with
	// pg_config --bindir, then PATH, then the newest /usr/lib/postgresql/*/bin.
	BinDir string
	// RunAsUser runs the server binaries when the effective uid is 0, since
	// PostgreSQL refuses to run as root. Default "postgres".
	RunAsUser string
	// Settings are extra server settings, passed as -c name=value.
	Settings map[string]string
	// Logger receives progress messages. Default slog.Default().
	Logger *slog.Logger

	// findBinDir and probeDocker replace binary discovery and the Docker
	// probe (tests use them to force the fallback paths).
	findBinDir  func(ctx context.Context) (string, error)
	probeDocker func(ctx context.Context) error
}

// Cluster is a private PostgreSQL cluster started by Start.
type Cluster struct {
	dataDir   string
	pgdata    string
	logFile   string
	binDir    string
	port      int
	portFixed bool // Config.Port was set: never move to another port
	settings  map[string]string
	cred      *syscall.Credential // nil unless running as root
	log       *slog.Logger
}

// Start initialises the cluster in cfg.DataDir if it holds none yet and
// starts it. A server still running from a previous run (for instance after
// a crash of the process that started it) is stopped and started again, so
// that the cluster always runs with cfg's port and settings.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("pgcluster: Config.DataDir is required")
	}
	dataDir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("pgcluster: resolve data directory %q: %w", cfg.DataDir, err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	find := cfg.findBinDir
	if find == nil {
		find = discoverBinDir
	}
	binDir := cfg.BinDir
	if binDir == "" {
		if binDir, err = find(ctx); err != nil {
			return nil, err
		}
	} else if err := checkBinDir(binDir); err != nil {
		return nil, fmt.Errorf("pgcluster: Config.BinDir: %w", err)
	}

	c := &Cluster{
		dataDir:   dataDir,
		pgdata:    filepath.Join(dataDir, pgdataName),
		logFile:   filepath.Join(dataDir, logFileName),
		binDir:    binDir,
		port:      cfg.Port,
		portFixed: cfg.Port != 0,
		settings:  cfg.Settings,
		log:       logger.With("component", "pgcluster", "data_dir", dataDir),
	}
	if os.Geteuid() == 0 {
		name := cfg.RunAsUser
		if name == "" {
			name = "postgres"
		}
		if c.cred, err = lookupCredential(name); err != nil {
			return nil, err
		}
	}
	if err := c.prepareDirs(); err != nil {
		return nil, err
	}
	if err := c.initdb(ctx); err != nil {
		return nil, err
	}
	if err := c.choosePort(); err != nil {
		return nil, err
	}
	running, err := c.running(ctx)
	if err != nil {
		return nil, err
	}
	if running {
		c.log.WarnContext(ctx, "cluster already running (left over by an earlier run); restarting it")
		if err := c.pgctl(ctx, "stop", "-w", "-m", StopFast.String(), "-D", c.pgdata); err != nil {
			return nil, fmt.Errorf("pgcluster: stop server left running in %s: %w", c.pgdata, err)
		}
	}
	if err := c.start(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// URL returns the connection URL of database on the cluster, as the
// superuser.
func (c *Cluster) URL(database string) string {
	return superuserURL("127.0.0.1:"+strconv.Itoa(c.port), database)
}

// Port returns the loopback port the cluster listens on.
func (c *Cluster) Port() int { return c.port }

// DataDir returns the directory Config.DataDir named, made absolute.
func (c *Cluster) DataDir() string { return c.dataDir }

// EnsureDatabase creates database name unless it exists.
func (c *Cluster) EnsureDatabase(ctx context.Context, name string) error {
	return ensureDatabase(ctx, c.URL("postgres"), name)
}

// Stop shuts the server down with mode and waits until it is gone. Stopping
// a cluster that is not running is not an error.
func (c *Cluster) Stop(ctx context.Context, mode StopMode) error {
	running, err := c.running(ctx)
	if err != nil || !running {
		return err
	}
	c.log.InfoContext(ctx, "stopping cluster", "mode", mode.String())
	if err := c.pgctl(ctx, "stop", "-w", "-t", strconv.Itoa(int(startTimeout.Seconds())), "-m", mode.String(), "-D", c.pgdata); err != nil {
		return fmt.Errorf("pgcluster: stop (%s) %s: %w", mode, c.pgdata, err)
	}
	return nil
}

// Restart starts the cluster again after Stop, on the same port with the
// same data. After StopImmediate the server runs crash recovery first.
func (c *Cluster) Restart(ctx context.Context) error {
	running, err := c.running(ctx)
	if err != nil {
		return err
	}
	if running {
		if err := c.Stop(ctx, StopFast); err != nil {
			return err
		}
	}
	return c.start(ctx)
}

// prepareDirs creates DataDir and the data directory inside it and, when
// running as root, hands the data directory and log file to the server user.
func (c *Cluster) prepareDirs() error {
	if c.cred != nil {
		// Refuse before creating anything below an unusable parent.
		if err := checkTraversable(existingAncestor(c.dataDir), c.cred); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(c.dataDir, 0o755); err != nil {
		return fmt.Errorf("pgcluster: create data directory: %w", err)
	}
	if err := os.Mkdir(c.pgdata, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("pgcluster: create data directory: %w", err)
	}
	if c.cred == nil {
		return nil
	}
	if err := checkTraversable(c.dataDir, c.cred); err != nil {
		return err
	}
	fi, err := os.Stat(c.pgdata)
	if err != nil {
		return fmt.Errorf("pgcluster: %w", err)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != c.cred.Uid {
		if !isEmptyDir(c.pgdata) {
			return fmt.Errorf("pgcluster: data directory %s is owned by uid %d, but the server runs as uid %d (PostgreSQL refuses to run as root): chown -R it or remove it",
				c.pgdata, st.Uid, c.cred.Uid)
		}
		if err := os.Chown(c.pgdata, int(c.cred.Uid), int(c.cred.Gid)); err != nil {
			return fmt.Errorf("pgcluster: hand data directory to the server user: %w", err)
		}
	}
	// pg_ctl opens the log as the server user.
	f, err := os.OpenFile(c.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("pgcluster: create server log: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("pgcluster: create server log: %w", err)
	}
	if err := os.Chown(c.logFile, int(c.cred.Uid), int(c.cred.Gid)); err != nil {
		return fmt.Errorf("pgcluster: hand server log to the server user: %w", err)
	}
	return nil
}

// initdb initialises the data directory unless it already holds a cluster.
func (c *Cluster) initdb(ctx context.Context) error {
	if _, err := os.Stat(filepath.Join(c.pgdata, "PG_VERSION")); err == nil {
		c.log.DebugContext(ctx, "reusing existing cluster")
		return nil
	}
	if !isEmptyDir(c.pgdata) {
		return fmt.Errorf("pgcluster: %s is neither empty nor a PostgreSQL data directory (no PG_VERSION); remove it to start afresh", c.pgdata)
	}
	c.log.InfoContext(ctx, "initialising cluster", "bin_dir", c.binDir)
	out, err := c.command(ctx, "initdb",
		"-D", c.pgdata, "-A", "trust", "-U", Superuser, "-E", "UTF8", "--locale=C", "--no-sync").CombinedOutput()
	if err != nil {
		return fmt.Errorf("pgcluster: initdb %s: %w\n%s", c.pgdata, err, bytes.TrimSpace(out))
	}
	return nil
}

// choosePort settles the port: Config.Port, else the one recorded by an
// earlier run, else a free one; the choice is recorded for the next run.
func (c *Cluster) choosePort() error {
	portFile := filepath.Join(c.dataDir, portName)
	if c.port == 0 {
		if b, err := os.ReadFile(portFile); err == nil {
			if p, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && p > 0 && p < 65536 {
				c.port = p
			}
		}
	}
	if c.port == 0 {
		p, err := freePort()
		if err != nil {
			return err
		}
		c.port = p
	}
	return c.recordPort()
}

func (c *Cluster) recordPort() error {
	if err := os.WriteFile(filepath.Join(c.dataDir, portName), []byte(strconv.Itoa(c.port)+"\n"), 0o644); err != nil {
		return fmt.Errorf("pgcluster: record port: %w", err)
	}
	return nil
}

// start runs pg_ctl start. When the port is taken by someone else and was
// not fixed by Config.Port, it moves to a free port.
func (c *Cluster) start(ctx context.Context) error {
	const attempts = 3
	for attempt := 1; ; attempt++ {
		err := c.pgctl(ctx, "start", "-w", "-t", strconv.Itoa(int(startTimeout.Seconds())),
			"-D", c.pgdata, "-l", c.logFile, "-o", c.serverOptions())
		if err == nil {
			c.log.InfoContext(ctx, "cluster started", "port", c.port)
			return nil
		}
		tail := logTail(c.logFile, logTailLines)
		if c.portFixed || attempt == attempts || !strings.Contains(tail, "could not bind") {
			return fmt.Errorf("pgcluster: start server in %s on port %d: %w\nserver log %s (tail):\n%s",
				c.pgdata, c.port, err, c.logFile, tail)
		}
		port, perr := freePort()
		if perr != nil {
			return perr
		}
		c.log.WarnContext(ctx, "port taken; moving to another", "port", c.port, "new_port", port)
		c.port = port
		if err := c.recordPort(); err != nil {
			return err
		}
	}
}

// serverOptions is pg_ctl's -o argument: -c settings, shell-quoted because
// pg_ctl hands them to /bin/sh.
func (c *Cluster) serverOptions() string {
	settings := map[string]string{
		"listen_addresses":        "127.0.0.1",
		"port":                    strconv.Itoa(c.port),
		"unix_socket_directories": "", // no socket: the default directory may not be writable
	}
	for k, v := range c.settings {
		settings[k] = v
	}
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString("-c ")
		b.WriteString(shellQuote(k + "=" + settings[k]))
	}
	return b.String()
}

// running reports whether a server runs in the data directory (pg_ctl
// status: 0 running, 3 not running, 4 no data directory).
func (c *Cluster) running(ctx context.Context) (bool, error) {
	cmd := c.command(ctx, "pg_ctl", "status", "-D", c.pgdata)
	out, err := cmd.CombinedOutput()
	if err == nil {
		return true, nil
	}
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) && (exitErr.ExitCode() == 3 || exitErr.ExitCode() == 4) {
		return false, nil
	}
	return false, fmt.Errorf("pgcluster: pg_ctl status %s: %w\n%s", c.pgdata, err, bytes.TrimSpace(out))
}

func (c *Cluster) pgctl(ctx context.Context, args ...string) error {
	out, err := c.command(ctx, "pg_ctl", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("pg_ctl %s: %w: %s", args[0], err, bytes.TrimSpace(out))
	}
	return nil
}

// command prepares one of the server binaries, run as the server user when
// the process is root, with the environment cleared of libpq variables.
func (c *Cluster) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(c.binDir, name), args...)
	cmd.Dir = c.dataDir // the caller's working directory may be closed to the server user
	cmd.Env = serverEnv()
	if c.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

func serverEnv() []string {
	env := os.Environ()
	return slices.DeleteFunc(env, func(kv string) bool {
		return strings.HasPrefix(kv, "PG") || strings.HasPrefix(kv, "LC_") || strings.HasPrefix(kv, "LANG=")
	})
}

// lookupCredential resolves the user the server binaries run as.
func lookupCredential(name string) (*syscall.Credential, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return nil, fmt.Errorf("pgcluster: running as root, so PostgreSQL must run as another user, but user %q does not exist (create it, e.g. useradd --system postgres, or set RunAsUser): %w", name, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("pgcluster: user %q: uid %q: %w", name, u.Uid, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("pgcluster: user %q: gid %q: %w", name, u.Gid, err)
	}
	if uid == 0 {
		return nil, fmt.Errorf("pgcluster: RunAsUser %q is root; PostgreSQL refuses to run as root", name)
	}
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
	if ids, err := u.GroupIds(); err == nil {
		for _, id := range ids {
			if g, err := strconv.ParseUint(id, 10, 32); err == nil {
				cred.Groups = append(cred.Groups, uint32(g))
			}
		}
	}
	return cred, nil
}

// checkTraversable fails unless the server user may traverse dir and each
// of its parents (judged by permission bits; ACLs are not considered).
func checkTraversable(dir string, cred *syscall.Credential) error {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("pgcluster: %w", err)
		}
		if !canSearch(fi, cred) {
			return fmt.Errorf("pgcluster: directory %s is not traversable by uid %d, which runs PostgreSQL because PostgreSQL refuses to run as root: "+
				"make it traversable (chmod o+x %s) or choose a DataDir elsewhere", d, cred.Uid, d)
		}
		if parent := filepath.Dir(d); parent == d {
			return nil
		}
	}
}

func canSearch(fi os.FileInfo, cred *syscall.Credential) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return true
	}
	perm := fi.Mode().Perm()
	switch {
	case st.Uid == cred.Uid:
		return perm&0o100 != 0
	case st.Gid == cred.Gid || slices.Contains(cred.Groups, st.Gid):
		return perm&0o010 != 0
	default:
		return perm&0o001 != 0
	}
}

// existingAncestor returns dir or its nearest ancestor that exists.
func existingAncestor(dir string) string {
	for {
		if _, err := os.Stat(dir); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return dir
		}
		dir = parent
	}
}

func isEmptyDir(dir string) bool {
	f, err := os.Open(dir)
	if err != nil {
		return false
	}
	defer f.Close()
	_, err = f.Readdirnames(1)
	return errors.Is(err, io.EOF)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pgcluster: pick a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// logTail returns the last n lines of the server log.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func superuserURL(hostPort, database string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User(Superuser),
		Host:     hostPort,
		Path:     "/" + database,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// ensureDatabase creates database name on the server behind adminURL unless
// it exists.
func ensureDatabase(ctx context.Context, adminURL, name string) error {
	conn, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		return fmt.Errorf("pgcluster: connect to create database %q: %w", name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
		return fmt.Errorf("pgcluster: look up database %q: %w", name, err)
	}
	if exists {
		return nil
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42P04" { // duplicate_database: created concurrently
			return nil
		}
		return fmt.Errorf("pgcluster: create database %q: %w", name, err)
	}
	return nil
}
