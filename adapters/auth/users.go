package auth

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dealbridge/dealbridge/domain"
)

// User is a dashboard / operator-API user.
type User struct {
	ID         int64      `json:"id"`
	Name       string     `json:"name"`
	Role       Role       `json:"role"`
	Disabled   bool       `json:"disabled"`
	DisabledAt *time.Time `json:"disabled_at,omitempty"`
	CreatedAt  time.Time  `json:"created_at"`
	LastLogin  *time.Time `json:"last_login,omitempty"`
	Sessions   int        `json:"sessions"`
}

// ErrUserExists is AddUser for a name that is taken.
var ErrUserExists = errors.New("a user with this name exists")

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$`)

// Who is the actor of a user-management action, for the audit log.
type Who struct {
	Name      string
	Role      Role
	RequestID string
}

// AddUser creates a user with password (hashed with argon2id).
func (s *Service) AddUser(ctx context.Context, name string, role Role, password string, by Who) (User, error) {
	if !nameRE.MatchString(name) {
		return User{}, &domain.ValidationError{Field: "name", Reason: "must be 1-64 letters, digits or . _ @ - and start with a letter or digit"}
	}
	if !role.Valid() {
		return User{}, &domain.ValidationError{Field: "role", Reason: "must be viewer, operator or admin"}
	}
	hash, err := HashPassword(password)
	if err != nil {
		return User{}, &domain.ValidationError{Field: "password", Reason: err.Error()}
	}
	var u User
	err = s.tx(ctx, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `INSERT INTO users (name, role, password_hash) VALUES ($1, $2, $3) RETURNING id, name, role, created_at`,
			name, role, hash).Scan(&u.ID, &u.Name, &u.Role, &u.CreatedAt)
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "23505" {
			return fmt.Errorf("user %s: %w", name, ErrUserExists)
		}
		if err != nil {
			return fmt.Errorf("cannot add user: %w", err)
		}
		return audit(ctx, tx, by.Name, by.Role, "user.add", "user", name, "role "+string(role), by.RequestID)
	})
	return u, err
}

// ListUsers returns every user, by name.
func (s *Service) ListUsers(ctx context.Context) ([]User, error) {
	rows, err := s.pool.Query(ctx, `SELECT u.id, u.name, u.role, u.disabled_at, u.created_at,
			(SELECT max(created_at) FROM sessions WHERE user_id = u.id),
			(SELECT count(*) FROM sessions WHERE user_id = u.id AND expires_at > now())
		FROM users u ORDER BY u.name`)
	if err != nil {
		return nil, fmt.Errorf("cannot list users: %w", err)
	}
	us, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (User, error) {
		var u User
		err := r.Scan(&u.ID, &u.Name, &u.Role, &u.DisabledAt, &u.CreatedAt, &u.LastLogin, &u.Sessions)
		u.Disabled = u.DisabledAt != nil
		return u, err
	})
	if err != nil {
		return nil, fmt.Errorf("cannot list users: %w", err)
	}
	return us, nil
}

// CountUsers returns how many users exist.
func (s *Service) CountUsers(ctx context.Context) (int, error) {
	var n int
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM users`).Scan(&n); err != nil {
		return 0, fmt.Errorf("cannot count users: %w", err)
	}
	return n, nil
}

// SetRole changes a user's role; it applies to their sessions and tokens at
// their next request.
func (s *Service) SetRole(ctx context.Context, name string, role Role, by Who) error {
	if !role.Valid() {
		return &domain.ValidationError{Field: "role", Reason: "must be viewer, operator or admin"}
	}
	return s.tx(ctx, func(tx pgx.Tx) error {
		var old Role
		err := tx.QueryRow(ctx, `SELECT role FROM users WHERE name = $1 FOR UPDATE`, name).Scan(&old)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("user %s: %w", name, domain.ErrNotFound)
		}
		if err != nil {
			return fmt.Errorf("cannot read user: %w", err)
		}
		if old == RoleAdmin && role != RoleAdmin {
			if err := lastAdminGuard(ctx, tx, name); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `UPDATE users SET role = $2, updated_at = now() WHERE name = $1`, name, role); err != nil {
			return fmt.Errorf("cannot set role: %w", err)
		}
		return audit(ctx, tx, by.Name, by.Role, "user.set_role", "user", name, string(old)+" -> "+string(role), by.RequestID)
	})
}

// ErrLastAdmin refuses to leave the system without an enabled admin.
var ErrLastAdmin = errors.New("this is the last enabled admin")

func lastAdminGuard(ctx context.Context, tx pgx.Tx, name string) error {
	var n int
	if err := tx.QueryRow(ctx, `SELECT count(*) FROM users WHERE role = 'admin' AND disabled_at IS NULL AND name <> $1`, name).Scan(&n); err != nil {
		return fmt.Errorf("cannot count admins: %w", err)
	}
	if n == 0 {
		return fmt.Errorf("user %s: %w", name, ErrLastAdmin)
	}
	return nil
}

// SetDisabled disables (ending every session and stopping every token at
// once) or re-enables a user.
func (s *Service) SetDisabled(ctx context.Context, name string, disabled bool, by Who) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		var role Role
		err := tx.QueryRow(ctx, `SELECT role FROM users WHERE name = $1 FOR UPDATE`, name).Scan(&role)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("user %s: %w", name, domain.ErrNotFound)
		}
		if err != nil {
			return fmt.Errorf("cannot read user: %w", err)
		}
		action := "user.enable"
		if disabled {
			action = "user.disable"
			if role == RoleAdmin {
				if err := lastAdminGuard(ctx, tx, name); err != nil {
					return err
				}
			}
			if _, err := tx.Exec(ctx, `UPDATE users SET disabled_at = now(), updated_at = now() WHERE name = $1 AND disabled_at IS NULL`, name); err != nil {
				return fmt.Errorf("cannot disable user: %w", err)
			}
			if _, err := tx.Exec(ctx, `DELETE FROM sessions WHERE user_id = (SELECT id FROM users WHERE name = $1)`, name); err != nil {
				return fmt.Errorf("cannot end sessions: %w", err)
			}
		} else if _, err := tx.Exec(ctx, `UPDATE users SET disabled_at = NULL, updated_at = now() WHERE name = $1`, name); err != nil {
			return fmt.Errorf("cannot enable user: %w", err)
		}
		return audit(ctx, tx, by.Name, by.Role, action, "user", name, "", by.RequestID)
	})
}

// SetPassword replaces a user's password and ends their sessions.
func (s *Service) SetPassword(ctx context.Context, name, password string, by Who) error {
	hash, err := HashPassword(password)
	if err != nil {
		return &domain.ValidationError{Field: "password", Reason: err.Error()}
	}
	return s.tx(ctx, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE users SET password_hash = $2, updated_at = now() WHERE name = $1`, name, hash)
		if err != nil {
			return fmt.Errorf("cannot set password: %w", err)
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("user %s: %w", name, domain.ErrNotFound)
		}
		if _, err := tx.Exec(ctx, `DELETE FROM sessions WHERE user_id = (SELECT id FROM users WHERE name = $1)`, name); err != nil {
			return fmt.Errorf("cannot end sessions: %w", err)
		}
		return audit(ctx, tx, by.Name, by.Role, "user.set_password", "user", name, "", by.RequestID)
	})
}

// CreateToken issues an API token for a user and returns it; only its hash
// is stored, so it is shown this once. It acts with the user's role.
func (s *Service) CreateToken(ctx context.Context, name, label string, by Who) (string, error) {
	tok := TokenPrefix + rand.Text() + rand.Text()
	err := s.tx(ctx, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `INSERT INTO api_tokens (user_id, label, token_hash)
			SELECT id, $2, $3 FROM users WHERE name = $1`, name, label, hashToken(tok))
		if err != nil {
			return fmt.Errorf("cannot create token: %w", err)
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("user %s: %w", name, domain.ErrNotFound)
		}
		return audit(ctx, tx, by.Name, by.Role, "user.create_token", "user", name, label, by.RequestID)
	})
	if err != nil {
		return "", err
	}
	return tok, nil
}

func (s *Service) tx(ctx context.Context, fn func(pgx.Tx) error) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("cannot begin: %w", err)
	}
	defer tx.Rollback(ctx)
	if err := fn(tx); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("cannot commit: %w", err)
	}
	return nil
}

// audit appends a row to the audit log in tx (the same table and columns
// as the dead-letter actions).
func audit(ctx context.Context, tx pgx.Tx, actor string, role Role, action, targetType, targetID, reason, requestID string) error {
	var req any
	if requestID != "" {
		req = requestID
	}
	if _, err := tx.Exec(ctx, `INSERT INTO audit_log (actor, role, action, target_type, target_id, reason, request_id)
		VALUES ($1, $2, $3, $4, $5, $6, $7)`, actor, string(role), action, targetType, targetID, reason, req); err != nil {
		return fmt.Errorf("cannot write audit log: %w", err)
	}
	return nil
}
