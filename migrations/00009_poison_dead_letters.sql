-- +goose Up

-- A poison message is dead-lettered at most once per Watermill message UUID.
--
-- The relay's and the work queue's PoisonQueue both publish to the
-- DeadLetterPublisher (adapters/postgres/deadletter.go). The queue's
-- dead letter commits in a transaction of its own, before the message is
-- acknowledged: a crash in between redelivers the message, which would be
-- poisoned and dead-lettered again. The publisher claims the message UUID
-- here (INSERT ... ON CONFLICT DO NOTHING) in the transaction that appends
-- MessageDeadLettered, before it appends it; a message already claimed is
-- acknowledged without a second dead letter, alert or event.
--
-- This is not a projection of the event log (replay does not rebuild it):
-- a unique index on dead_letters itself would make a rebuild fail on the
-- duplicates that event logs written before this migration may hold.
CREATE TABLE poison_dead_letters (
    message_uuid   text        PRIMARY KEY,
    dead_letter_id uuid,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Poison messages dead-lettered before this migration: the oldest dead
-- letter of each message UUID holds the claim.
INSERT INTO poison_dead_letters (message_uuid, dead_letter_id, created_at)
SELECT DISTINCT ON (message_uuid) message_uuid, id, created_at
  FROM dead_letters
 WHERE error_class = 'poison'
 ORDER BY message_uuid, created_at, id;

-- +goose Down
DROP TABLE poison_dead_letters;
