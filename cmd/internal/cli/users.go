package cli

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/cmd/app"
)

// ---- the HTTP front's auth settings (api and dev) ----

type httpFlags struct {
	tokenFile string
	idle      time.Duration
	maxAge    time.Duration
	cookies   string
	openCRM   bool
}

func (h *httpFlags) register(f *flags) {
	f.string(&h.tokenFile, "api-token-file", "DEALBRIDGE_API_TOKEN_FILE", "",
		"file holding the bearer token the CRM-facing API requires (or set $DEALBRIDGE_API_TOKEN); without one the CRM API is open, which only a loopback address allows")
	f.duration(&h.idle, "session-idle-timeout", "DEALBRIDGE_SESSION_IDLE_TIMEOUT", 30*time.Minute, "a dashboard session unused this long ends")
	f.duration(&h.maxAge, "session-max-age", "DEALBRIDGE_SESSION_MAX_AGE", 12*time.Hour, "a dashboard session ends this long after login, used or not")
	f.string(&h.cookies, "secure-cookies", "DEALBRIDGE_SECURE_COOKIES", "auto",
		"auto: the session cookie is Secure and __Host- prefixed when the request came over TLS; always: on every request (behind a TLS-terminating proxy)")
	f.BoolVar(&h.openCRM, "allow-open-crm-api", false, "serve the CRM-facing API without a token on a non-loopback address (not recommended)")
}

// config builds the HTTP front's configuration for a server listening on
// addr; open reports a CRM API without a token.
func (h *httpFlags) config(env Env, addr net.Addr) (cfg app.HTTPConfig, open bool, err error) {
	if h.idle <= 0 || h.maxAge <= 0 || h.idle > h.maxAge {
		return cfg, false, &usageError{msg: "--session-idle-timeout and --session-max-age must be positive, the idle timeout not above the max age"}
	}
	switch h.cookies {
	case "auto", "always":
	default:
		return cfg, false, &usageError{msg: "--secure-cookies must be auto or always"}
	}
	// The token never comes from the command line, where ps would show it.
	token := env.Getenv("DEALBRIDGE_API_TOKEN")
	if h.tokenFile != "" {
		b, err := os.ReadFile(h.tokenFile)
		if err != nil {
			return cfg, false, fmt.Errorf("cannot read --api-token-file: %w", err)
		}
		token = string(b)
	}
	token = strings.TrimSpace(token)
	if token != "" && len(token) < 16 {
		return cfg, false, &usageError{msg: "the CRM API token must have at least 16 characters"}
	}
	if token == "" && !h.openCRM && !isLoopback(addr) {
		return cfg, false, &usageError{msg: fmt.Sprintf("refusing to serve the CRM API without a token on %s: set DEALBRIDGE_API_TOKEN (or --api-token-file), listen on a loopback address, or pass --allow-open-crm-api", addr)}
	}
	cfg.Auth = auth.Config{IdleTimeout: h.idle, AbsoluteTimeout: h.maxAge, SecureCookies: h.cookies == "always", CRMToken: token}
	return cfg, token == "", nil
}

func isLoopback(addr net.Addr) bool {
	if ta, ok := addr.(*net.TCPAddr); ok {
		return ta.IP.IsLoopback()
	}
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return host == "localhost" || (ip != nil && ip.IsLoopback())
}

// bootstrapAdmin creates the first admin, "admin", with a generated
// password when no user exists, and returns the password ("" when users
// exist already).
func bootstrapAdmin(ctx context.Context, pool *pgxpool.Pool) (string, error) {
	svc := auth.New(pool, auth.Config{})
	n, err := svc.CountUsers(ctx)
	if err != nil || n > 0 {
		return "", err
	}
	pw := auth.GeneratePassword()
	if _, err := svc.AddUser(ctx, "admin", auth.RoleAdmin, pw, auth.Who{Name: "dev", Role: auth.RoleAdmin}); err != nil {
		return "", err
	}
	return pw, nil
}

// ---- dealbridge users ----

func runUsers(ctx context.Context, env Env, args []string) error {
	return subcommand(ctx, env, "users", args, map[string]func(context.Context, Env, []string) error{
		"add":     usersAdd,
		"list":    usersList,
		"disable": func(ctx context.Context, env Env, args []string) error { return usersSetDisabled(ctx, env, args, true) },
		"enable": func(ctx context.Context, env Env, args []string) error {
			return usersSetDisabled(ctx, env, args, false)
		},
		"set-role":       usersSetRole,
		"reset-password": usersResetPassword,
		"token":          usersToken,
	})
}

func (o *opFlags) auth(ctx context.Context, needActor bool) (*auth.Service, auth.Who, func(), error) {
	store, actor, closeFn, err := o.open(ctx, needActor)
	if err != nil {
		return nil, auth.Who{}, nil, err
	}
	return auth.New(store.Pool(), auth.Config{}), auth.Who{Name: actor.Name, Role: auth.RoleAdmin, RequestID: actor.RequestID}, closeFn, nil
}

// password reads a password from file ("-": standard input), or generates
// one when file is empty; generated reports which.
func password(file string) (pw string, generated bool, err error) {
	if file == "" {
		return auth.GeneratePassword(), true, nil
	}
	var b []byte
	if file == "-" {
		b, err = readAllLimit(os.Stdin, 4096)
	} else {
		b, err = os.ReadFile(file)
	}
	if err != nil {
		return "", false, fmt.Errorf("cannot read the password: %w", err)
	}
	return strings.TrimRight(string(b), "\r\n"), false, nil
}

func readAllLimit(f *os.File, n int) ([]byte, error) {
	buf := make([]byte, n)
	total := 0
	for total < n {
		k, err := f.Read(buf[total:])
		total += k
		if err != nil {
			break
		}
	}
	return buf[:total], nil
}

func usersAdd(ctx context.Context, env Env, args []string) error {
	var (
		o      opFlags
		role   string
		pwFile string
	)
	f := newFlags(env, "users add", "users add NAME --role viewer|operator|admin --actor NAME [--password-file F|-]")
	o.register(f, true)
	f.StringVar(&role, "role", "viewer", "viewer (reads, customer fields masked), operator (acknowledges, re-injects, discards) or admin (edits, approves, manages users)")
	f.StringVar(&pwFile, "password-file", "", "read the password from this file (- for standard input); default: generate one and print it")
	name, err := withID(f, args, "user name")
	if err != nil {
		return err
	}
	r, err := auth.ParseRole(role)
	if err != nil {
		return &usageError{msg: err.Error()}
	}
	pw, generated, err := password(pwFile)
	if err != nil {
		return err
	}
	svc, by, closeFn, err := o.auth(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	if _, err := svc.AddUser(ctx, name, r, pw, by); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "user %s added with role %s\n", name, r)
	if generated {
		fmt.Fprintf(env.Stdout, "password: %s\n", pw)
	}
	return nil
}

func usersList(ctx context.Context, env Env, args []string) error {
	var o opFlags
	f := newFlags(env, "users list", "users list [--json]")
	o.register(f, false)
	if err := f.parse(args); err != nil {
		return err
	}
	svc, _, closeFn, err := o.auth(ctx, false)
	if err != nil {
		return err
	}
	defer closeFn()
	us, err := svc.ListUsers(ctx)
	if err != nil {
		return err
	}
	if o.asJSON {
		return writeJSONTo(env.Stdout, us)
	}
	tw := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tROLE\tSTATE\tCREATED\tLAST LOGIN\tSESSIONS")
	for _, u := range us {
		state := "enabled"
		if u.Disabled {
			state = "disabled"
		}
		last := ""
		if u.LastLogin != nil {
			last = u.LastLogin.UTC().Format("2006-01-02 15:04:05")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\n", u.Name, u.Role, state, u.CreatedAt.UTC().Format("2006-01-02 15:04:05"), last, u.Sessions)
	}
	return tw.Flush()
}

func usersSetDisabled(ctx context.Context, env Env, args []string, disabled bool) error {
	verb := map[bool]string{true: "disable", false: "enable"}[disabled]
	var o opFlags
	f := newFlags(env, "users "+verb, "users "+verb+" NAME --actor NAME")
	o.register(f, true)
	name, err := withID(f, args, "user name")
	if err != nil {
		return err
	}
	svc, by, closeFn, err := o.auth(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	if err := svc.SetDisabled(ctx, name, disabled, by); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "user %s %sd\n", name, verb)
	return nil
}

func usersSetRole(ctx context.Context, env Env, args []string) error {
	var (
		o    opFlags
		role string
	)
	f := newFlags(env, "users set-role", "users set-role NAME --role viewer|operator|admin --actor NAME")
	o.register(f, true)
	f.StringVar(&role, "role", "", "the new role (required)")
	name, err := withID(f, args, "user name")
	if err != nil {
		return err
	}
	r, err := auth.ParseRole(role)
	if err != nil {
		return &usageError{msg: err.Error()}
	}
	svc, by, closeFn, err := o.auth(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	if err := svc.SetRole(ctx, name, r, by); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "user %s is now %s\n", name, r)
	return nil
}

func usersResetPassword(ctx context.Context, env Env, args []string) error {
	var (
		o      opFlags
		pwFile string
	)
	f := newFlags(env, "users reset-password", "users reset-password NAME --actor NAME [--password-file F|-]")
	o.register(f, true)
	f.StringVar(&pwFile, "password-file", "", "read the password from this file (- for standard input); default: generate one and print it")
	name, err := withID(f, args, "user name")
	if err != nil {
		return err
	}
	pw, generated, err := password(pwFile)
	if err != nil {
		return err
	}
	svc, by, closeFn, err := o.auth(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	if err := svc.SetPassword(ctx, name, pw, by); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "password of %s replaced; their sessions ended\n", name)
	if generated {
		fmt.Fprintf(env.Stdout, "password: %s\n", pw)
	}
	return nil
}

func usersToken(ctx context.Context, env Env, args []string) error {
	var (
		o     opFlags
		label string
	)
	f := newFlags(env, "users token", "users token NAME --actor NAME [--label TEXT]")
	o.register(f, true)
	f.StringVar(&label, "label", "script", "what the token is for")
	name, err := withID(f, args, "user name")
	if err != nil {
		return err
	}
	svc, by, closeFn, err := o.auth(ctx, true)
	if err != nil {
		return err
	}
	defer closeFn()
	tok, err := svc.CreateToken(ctx, name, label, by)
	if err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "API token for %s (acts with their role; shown once):\n%s\n", name, tok)
	return nil
}
