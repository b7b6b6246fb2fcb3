-- +goose Up

-- Wake the relay when outbox rows commit (NOTIFY is delivered at commit, and
-- Postgres folds identical notifications of one transaction into one). A
-- statement-level trigger costs the writer no extra round trip. NOTIFY is a
-- wake-up only: the relay still polls, so a lost notification delays a row
-- by at most the poll interval and loses nothing.
-- +goose StatementBegin
CREATE FUNCTION dealbridge_notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dealbridge_outbox', '');
    RETURN NULL;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER watermill_outbox_notify AFTER INSERT ON "watermill_outbox"
    FOR EACH STATEMENT EXECUTE FUNCTION dealbridge_notify_outbox();

-- +goose Down
DROP TRIGGER watermill_outbox_notify ON "watermill_outbox";
DROP FUNCTION dealbridge_notify_outbox();
