-- +goose Up

-- Watermill's DefaultPostgreSQLSchema and DefaultPostgreSQLOffsetsAdapter
-- tables for the "outbox" topic, byte for byte what the library would create.
-- transaction_id + the snapshot xmin is what makes the relay gap-safe: a row
-- whose transaction commits late can never be overtaken by the cursor.
CREATE TABLE IF NOT EXISTS "watermill_outbox" (
    "offset" BIGSERIAL,
    "uuid" VARCHAR(36) NOT NULL,
    "created_at" TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "payload" JSON DEFAULT NULL,
    "metadata" JSON DEFAULT NULL,
    "transaction_id" xid8 NOT NULL,
    PRIMARY KEY ("transaction_id", "offset")
);

CREATE TABLE IF NOT EXISTS "watermill_offsets_outbox" (
    consumer_group VARCHAR(255) NOT NULL,
    offset_acked BIGINT,
    last_processed_transaction_id xid8 NOT NULL,
    PRIMARY KEY(consumer_group)
);

-- +goose Down
DROP TABLE "watermill_offsets_outbox";
DROP TABLE "watermill_outbox";
