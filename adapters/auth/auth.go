// Package auth is who may call what: users with argon2id password hashes,
// server-side sessions in Postgres behind a cookie, bearer API tokens, a
// login rate limit, and the three roles (viewer, operator, admin) that every
// operator handler checks on the server.
//
// Sessions: the cookie holds 256 random bits and the database only their
// SHA-256. The cookie is HttpOnly and SameSite=Lax; under TLS (or with
// Config.SecureCookies behind a TLS-terminating proxy) it is Secure and
// named with the __Host- prefix, which browsers accept only from a secure
// origin, for path /, without a Domain. A login always issues a new session
// id (and deletes the one presented), so a planted id is never promoted.
// Idle and absolute timeouts are checked on every request against the
// database clock; a disabled user's sessions and tokens stop working at once.
//
// CSRF is not this package's job: the handlers are wrapped in Go's
// http.CrossOriginProtection (Sec-Fetch-Site, Origin fallback), and no
// handler changes state on GET.
package auth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Role is what a user may do. Each role includes the ones below it.
type Role string

// The roles, least to most privileged. RoleNone is a caller that is not a
// user (the CRM's token).
const (
	RoleNone     Role = ""
	RoleViewer   Role = "viewer"
	RoleOperator Role = "operator"
	RoleAdmin    Role = "admin"
)

func (r Role) rank() int {
	switch r {
	case RoleViewer:
		return 1
	case RoleOperator:
		return 2
	case RoleAdmin:
		return 3
	}
	return 0
}

// AtLeast reports whether r includes min.
func (r Role) AtLeast(min Role) bool { return r.rank() > 0 && r.rank() >= min.rank() }

// Valid reports whether r is one of the three user roles.
func (r Role) Valid() bool { return r.rank() > 0 }

// ParseRole parses a role name.
func ParseRole(s string) (Role, error) {
	r := Role(strings.ToLower(strings.TrimSpace(s)))
	if !r.Valid() {
		return "", fmt.Errorf("unknown role %q (viewer, operator or admin)", s)
	}
	return r, nil
}

// How a principal authenticated.
const (
	ViaSession  = "session"
	ViaToken    = "token"
	ViaCRMToken = "crm-token"
)

// Principal is the authenticated caller of a request.
type Principal struct {
	UserID int64
	Name   string
	Role   Role
	Via    string
}

// CanSeePII reports whether customer fields are shown unmasked.
func (p Principal) CanSeePII() bool { return p.Role.AtLeast(RoleOperator) }

type ctxKey int

const (
	principalKey ctxKey = iota
	expiredKey
)

// FromContext returns the request's principal, if it authenticated.
func FromContext(ctx context.Context) (Principal, bool) {
	p, ok := ctx.Value(principalKey).(Principal)
	return p, ok
}

// WithPrincipal returns ctx carrying p (for tests of handlers).
func WithPrincipal(ctx context.Context, p Principal) context.Context {
	return context.WithValue(ctx, principalKey, p)
}

// SessionExpired reports whether the request presented a session cookie
// that is no longer valid (expired, logged out or its user disabled).
func SessionExpired(ctx context.Context) bool { v, _ := ctx.Value(expiredKey).(bool); return v }

// Config configures a Service.
type Config struct {
	// IdleTimeout ends a session not used for this long (default 30m).
	IdleTimeout time.Duration
	// AbsoluteTimeout ends a session this long after login (default 12h).
	AbsoluteTimeout time.Duration
	// SecureCookies marks the session cookie Secure (and names it with the
	// __Host- prefix) on every request, for a server behind a TLS-terminating
	// proxy. Without it, only requests that arrived over TLS get them.
	SecureCookies bool
	// CRMToken, when set, is the bearer token the CRM-facing API requires.
	CRMToken string
	// LoginBurst attempts per client address and per user name are allowed
	// at once, then one per LoginRefill (defaults 10 and 6s).
	LoginBurst  int
	LoginRefill time.Duration
	Logger      *slog.Logger
}

// Service authenticates requests and manages users, sessions and tokens.
type Service struct {
	pool    *pgxpool.Pool
	cfg     Config
	limiter *limiter
	log     *slog.Logger
}

// New returns a Service over pool.
func New(pool *pgxpool.Pool, cfg Config) *Service {
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 30 * time.Minute
	}
	if cfg.AbsoluteTimeout <= 0 {
		cfg.AbsoluteTimeout = 12 * time.Hour
	}
	if cfg.LoginBurst <= 0 {
		cfg.LoginBurst = 10
	}
	if cfg.LoginRefill <= 0 {
		cfg.LoginRefill = 6 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Service{pool: pool, cfg: cfg, limiter: newLimiter(cfg.LoginBurst, cfg.LoginRefill), log: cfg.Logger}
}

// Config returns the service's configuration (with defaults applied).
func (s *Service) Config() Config { return s.cfg }

// CRMTokenRequired reports whether the CRM-facing API needs a token.
func (s *Service) CRMTokenRequired() bool { return s.cfg.CRMToken != "" }

// Cookie names: the __Host- prefix needs Secure, which needs TLS.
const (
	SecureCookieName = "__Host-dealbridge_session"
	PlainCookieName  = "dealbridge_session"
)

func (s *Service) secure(r *http.Request) bool { return s.cfg.SecureCookies || r.TLS != nil }

func (s *Service) cookieName(r *http.Request) string {
	if s.secure(r) {
		return SecureCookieName
	}
	return PlainCookieName
}

func (s *Service) setCookie(w http.ResponseWriter, r *http.Request, value string, clear bool) {
	c := &http.Cookie{
		Name: s.cookieName(r), Value: value, Path: "/", HttpOnly: true, Secure: s.secure(r), SameSite: http.SameSiteLaxMode,
	}
	if clear {
		c.Value = ""
		c.MaxAge = -1
	}
	http.SetCookie(w, c)
}

func hashToken(tok string) []byte {
	h := sha256.Sum256([]byte(tok))
	return h[:]
}

// TokenPrefix starts every API token, so that a leaked one is recognisable
// (secret scanners) and never mistaken for the CRM token.
const TokenPrefix = "dbt_"

// Middleware authenticates the request, by bearer token or session cookie,
// and puts its Principal in the context. It refuses nothing itself: each
// handler states the role it needs (Require).
func (s *Service) Middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		p, expired, err := s.authenticate(w, r)
		if err != nil {
			s.log.ErrorContext(ctx, "authentication failed", "err", err)
			http.Error(w, "authentication is unavailable", http.StatusServiceUnavailable)
			return
		}
		if p != nil {
			ctx = context.WithValue(ctx, principalKey, *p)
		}
		if expired {
			ctx = context.WithValue(ctx, expiredKey, true)
		}
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

func (s *Service) authenticate(w http.ResponseWriter, r *http.Request) (*Principal, bool, error) {
	ctx := r.Context()
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, tok, ok := strings.Cut(h, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
			return nil, false, nil
		}
		tok = strings.TrimSpace(tok)
		if s.cfg.CRMToken != "" && subtle.ConstantTimeCompare(hashToken(tok), hashToken(s.cfg.CRMToken)) == 1 {
			return &Principal{Name: "crm", Role: RoleNone, Via: ViaCRMToken}, false, nil
		}
		if !strings.HasPrefix(tok, TokenPrefix) {
			return nil, false, nil
		}
		var p Principal
		err := s.pool.QueryRow(ctx, `UPDATE api_tokens t SET last_used_at = now() FROM users u
			WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND u.id = t.user_id AND u.disabled_at IS NULL
			RETURNING u.id, u.name, u.role`, hashToken(tok)).Scan(&p.UserID, &p.Name, &p.Role)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, false, nil
		}
		if err != nil {
			return nil, false, fmt.Errorf("cannot check API token: %w", err)
		}
		p.Via = ViaToken
		return &p, false, nil
	}
	c, err := r.Cookie(s.cookieName(r))
	if err != nil || c.Value == "" {
		return nil, false, nil
	}
	var p Principal
	err = s.pool.QueryRow(ctx, `UPDATE sessions s SET last_seen_at = now() FROM users u
		WHERE s.id_hash = $1 AND u.id = s.user_id AND u.disabled_at IS NULL
		  AND s.expires_at > now() AND s.last_seen_at > now() - make_interval(secs => $2)
		RETURNING u.id, u.name, u.role`, hashToken(c.Value), s.cfg.IdleTimeout.Seconds()).Scan(&p.UserID, &p.Name, &p.Role)
	if errors.Is(err, pgx.ErrNoRows) {
		// Expired, logged out, or never issued: tell the browser to forget it.
		s.setCookie(w, r, "", true)
		return nil, true, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("cannot check session: %w", err)
	}
	p.Via = ViaSession
	return &p, false, nil
}

// ErrBadCredentials is a failed login; it never says which part was wrong.
var ErrBadCredentials = errors.New("unknown user or wrong password")

// RateLimitedError is a login refused by the rate limit.
type RateLimitedError struct{ RetryAfter time.Duration }

func (e *RateLimitedError) Error() string {
	return fmt.Sprintf("too many login attempts; try again in %s", e.RetryAfter.Round(time.Second))
}

// ClientIP is the address the request came from (the TCP peer: forwarding
// headers are not trusted).
func ClientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// Login checks name and password and, when they match an enabled user,
// starts a new session and sets its cookie. Attempts are rate limited per
// client address and per user name.
func (s *Service) Login(w http.ResponseWriter, r *http.Request, name, password string) (Principal, error) {
	ctx := r.Context()
	name = strings.TrimSpace(name)
	if d := s.limiter.take("ip:"+ClientIP(r), "user:"+strings.ToLower(name)); d > 0 {
		s.log.WarnContext(ctx, "login rate limited", "user", name, "remote", ClientIP(r))
		return Principal{}, &RateLimitedError{RetryAfter: d}
	}
	var (
		p    Principal
		hash string
	)
	err := s.pool.QueryRow(ctx, `SELECT id, name, role, password_hash FROM users WHERE name = $1 AND disabled_at IS NULL`, name).
		Scan(&p.UserID, &p.Name, &p.Role, &hash)
	if errors.Is(err, pgx.ErrNoRows) {
		VerifyPassword(dummyHash, password) // same work as a real check
		s.log.WarnContext(ctx, "login failed", "user", name, "remote", ClientIP(r))
		return Principal{}, ErrBadCredentials
	}
	if err != nil {
		return Principal{}, fmt.Errorf("cannot look up user: %w", err)
	}
	if !VerifyPassword(hash, password) {
		s.log.WarnContext(ctx, "login failed", "user", name, "remote", ClientIP(r))
		return Principal{}, ErrBadCredentials
	}
	tok := rand.Text() + rand.Text() // 256 bits
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return Principal{}, fmt.Errorf("cannot start session: %w", err)
	}
	defer tx.Rollback(ctx)
	// A new id at every login: the presented one (if any) is deleted, so a
	// session id planted before login is never promoted (fixation).
	if c, err := r.Cookie(s.cookieName(r)); err == nil && c.Value != "" {
		if _, err := tx.Exec(ctx, `DELETE FROM sessions WHERE id_hash = $1`, hashToken(c.Value)); err != nil {
			return Principal{}, fmt.Errorf("cannot end previous session: %w", err)
		}
	}
	if _, err := tx.Exec(ctx, `DELETE FROM sessions WHERE expires_at <= now() OR last_seen_at <= now() - make_interval(secs => $1)`,
		s.cfg.IdleTimeout.Seconds()); err != nil {
		return Principal{}, fmt.Errorf("cannot clean up sessions: %w", err)
	}
	ua := r.UserAgent()
	if len(ua) > 300 {
		ua = ua[:300]
	}
	if _, err := tx.Exec(ctx, `INSERT INTO sessions (id_hash, user_id, expires_at, remote_addr, user_agent)
		VALUES ($1, $2, now() + make_interval(secs => $3), $4, $5)`,
		hashToken(tok), p.UserID, s.cfg.AbsoluteTimeout.Seconds(), ClientIP(r), ua); err != nil {
		return Principal{}, fmt.Errorf("cannot start session: %w", err)
	}
	if err := audit(ctx, tx, p.Name, p.Role, "user.login", "user", p.Name, "from "+ClientIP(r), requestID(r)); err != nil {
		return Principal{}, err
	}
	if err := tx.Commit(ctx); err != nil {
		return Principal{}, fmt.Errorf("cannot start session: %w", err)
	}
	s.limiter.forget("user:" + strings.ToLower(name))
	s.setCookie(w, r, tok, false)
	p.Via = ViaSession
	s.log.InfoContext(ctx, "login", "user", p.Name, "role", p.Role, "remote", ClientIP(r))
	return p, nil
}

// Logout ends the request's session (if any) and clears its cookie.
func (s *Service) Logout(w http.ResponseWriter, r *http.Request) error {
	defer s.setCookie(w, r, "", true)
	c, err := r.Cookie(s.cookieName(r))
	if err != nil || c.Value == "" {
		return nil
	}
	if _, err := s.pool.Exec(r.Context(), `DELETE FROM sessions WHERE id_hash = $1`, hashToken(c.Value)); err != nil {
		return fmt.Errorf("cannot end session: %w", err)
	}
	return nil
}

// Deny writes a refusal: status is 401 (not authenticated) or 403 (not
// allowed).
type Deny func(w http.ResponseWriter, r *http.Request, status int)

// Require wraps h so that it runs only for a user whose role includes min;
// everyone else gets deny with 401 or 403. Deny by default: every operator
// route is registered through it.
func Require(min Role, deny Deny, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		p, ok := FromContext(r.Context())
		switch {
		case !ok || !p.Role.Valid():
			deny(w, r, http.StatusUnauthorized)
		case !p.Role.AtLeast(min):
			deny(w, r, http.StatusForbidden)
		default:
			h(w, r)
		}
	}
}

// RequireCRM wraps a CRM-facing handler: with a CRM token configured it
// runs for that token or an admin; without one it runs for anyone (dev on
// loopback).
func (s *Service) RequireCRM(deny Deny, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.cfg.CRMToken == "" {
			h(w, r)
			return
		}
		p, ok := FromContext(r.Context())
		switch {
		case ok && (p.Via == ViaCRMToken || p.Role.AtLeast(RoleAdmin)):
			h(w, r)
		case ok:
			deny(w, r, http.StatusForbidden)
		default:
			w.Header().Set("WWW-Authenticate", `Bearer realm="dealbridge"`)
			deny(w, r, http.StatusUnauthorized)
		}
	}
}

// requestIDHeader is set by the HTTP layers' request-id middleware.
func requestID(r *http.Request) string {
	if id := r.Header.Get("X-Request-ID"); id != "" && len(id) <= 128 {
		return id
	}
	return ""
}
