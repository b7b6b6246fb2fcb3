-- +goose Up

-- Dashboard and operator-API users. Passwords are argon2id hashes in PHC
-- string form ($argon2id$v=19$m=...,t=...,p=...$salt$hash); a disabled user
-- can neither log in nor use a session or token issued before.
CREATE TABLE users (
    id            bigserial   PRIMARY KEY,
    name          text        NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$'),
    role          text        NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    password_hash text        NOT NULL,
    disabled_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Server-side sessions. The cookie holds a random 256-bit value; only its
-- SHA-256 is stored, so a read of this table yields no usable session.
-- expires_at is the absolute timeout; the idle timeout is checked against
-- last_seen_at with the configured duration.
CREATE TABLE sessions (
    id_hash      bytea       PRIMARY KEY,
    user_id      bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    remote_addr  text        NOT NULL DEFAULT '',
    user_agent   text        NOT NULL DEFAULT ''
);
CREATE INDEX sessions_user_idx ON sessions (user_id);
CREATE INDEX sessions_expires_idx ON sessions (expires_at);

-- Bearer tokens for scripts: each belongs to a user and acts with that
-- user's current role. Only the SHA-256 of the token is stored.
CREATE TABLE api_tokens (
    id           bigserial   PRIMARY KEY,
    user_id      bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    label        text        NOT NULL,
    token_hash   bytea       NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_tokens_user_idx ON api_tokens (user_id);

-- The dashboard's last-hour chart reads events by time.
CREATE INDEX events_recorded_at_idx ON events (recorded_at);

-- +goose Down
DROP INDEX events_recorded_at_idx;
DROP TABLE api_tokens;
DROP TABLE sessions;
DROP TABLE users;
