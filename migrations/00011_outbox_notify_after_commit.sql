-- +goose Up

-- The relay is woken by a NOTIFY that writers send after their commit
-- (outbox.Notifier), not by this trigger: Postgres serialises the commits of
-- transactions that sent a NOTIFY, and the trigger made every close
-- transaction one of them.
DROP TRIGGER watermill_outbox_notify ON "watermill_outbox";
DROP FUNCTION dealbridge_notify_outbox();

-- +goose Down
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
