package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"time"

	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
	tcpostgres "github.com/testcontainers/testcontainers-go/modules/postgres"
)

// ContainerImage is the image Open runs when no local binaries exist.
const ContainerImage = "postgres:15-alpine"

const dockerProbeTimeout = 3 * time.Second

// Server is a running Postgres the caller can connect to.
type Server interface {
	// URL returns the connection URL of database, as a superuser.
	URL(database string) string
	// EnsureDatabase creates database name unless it exists.
	EnsureDatabase(ctx context.Context, name string) error
	// Close stops the server.
	Close(ctx context.Context) error
}

// Open provides a Postgres server: a private cluster from the local server
// binaries (Start; Close stops it with StopFast), or, when there are no
// binaries but a Docker engine answers, a throwaway testcontainers
// container running ContainerImage (cfg.DataDir and cfg.Port do not apply
// to it; its data is lost on Close). With neither it returns an error
// wrapping ErrNoPostgres that says what to install.
func Open(ctx context.Context, cfg Config) (Server, error) {
	c, err := Start(ctx, cfg)
	if err == nil {
		return localServer{c}, nil
	}
	if !errors.Is(err, ErrNoPostgres) {
		return nil, err
	}
	binErr := err
	probe := cfg.probeDocker
	if probe == nil {
		probe = probeDocker
	}
	if err := probe(ctx); err != nil {
		return nil, fmt.Errorf("%w: no PostgreSQL server binaries (initdb, pg_ctl) found and no Docker engine (%v): "+
			"install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) or set DATABASE_URL",
			ErrNoPostgres, err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	logger.WarnContext(ctx, "no local PostgreSQL binaries; starting a throwaway container", "image", ContainerImage, "reason", binErr)
	return startContainer(ctx, cfg.Settings)
}

type localServer struct{ *Cluster }

func (s localServer) Close(ctx context.Context) error { return s.Stop(ctx, StopFast) }

type containerServer struct {
	ctr      *tcpostgres.PostgresContainer
	hostPort string
}

func startContainer(ctx context.Context, settings map[string]string) (Server, error) {
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var args []string
	for _, k := range keys {
		args = append(args, "-c", k+"="+settings[k])
	}
	ctr, err := tcpostgres.Run(ctx, ContainerImage,
		tcpostgres.WithDatabase("postgres"),
		tcpostgres.WithUsername(Superuser),
		tcpostgres.WithPassword(Superuser),
		tcpostgres.BasicWaitStrategies(),
		testcontainers.WithCmdArgs(args...),
	)
	if err != nil {
		if ctr != nil {
			_ = testcontainers.TerminateContainer(ctr)
		}
		return nil, fmt.Errorf("pgcluster: start %s container: %w", ContainerImage, err)
	}
	endpoint, err := ctr.PortEndpoint(ctx, "5432/tcp", "")
	if err != nil {
		_ = testcontainers.TerminateContainer(ctr)
		return nil, fmt.Errorf("pgcluster: container endpoint: %w", err)
	}
	return &containerServer{ctr: ctr, hostPort: endpoint}, nil
}

func (s *containerServer) URL(database string) string {
	u := superuserURL(s.hostPort, database)
	// The container's superuser has a password.
	return strings.Replace(u, "://"+Superuser+"@", "://"+Superuser+":"+Superuser+"@", 1)
}

func (s *containerServer) EnsureDatabase(ctx context.Context, name string) error {
	return ensureDatabase(ctx, s.URL("postgres"), name)
}

func (s *containerServer) Close(ctx context.Context) error {
	if err := testcontainers.TerminateContainer(s.ctr, testcontainers.StopContext(ctx)); err != nil {
		return fmt.Errorf("pgcluster: terminate container: %w", err)
	}
	return nil
}

// probeDocker succeeds when a Docker engine answers a ping within a few
// seconds.
func probeDocker(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, dockerProbeTimeout)
	defer cancel()
	cli, err := testcontainers.NewDockerClientWithOpts(ctx)
	if err != nil {
		return fmt.Errorf("docker client: %w", err)
	}
	defer cli.Close()
	if _, err := cli.Ping(ctx, client.PingOptions{}); err != nil {
		return fmt.Errorf("docker ping: %w", err)
	}
	return nil
}
