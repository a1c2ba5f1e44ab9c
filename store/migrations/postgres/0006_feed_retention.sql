-- The change feed is pruned by the leader (Store::prune_feed): each entry
-- records when it was written (milliseconds since the epoch, the writer's
-- clock). Entries written before this migration get 0, so they are as old
-- as can be and prunable at once (beyond the newest kept).
ALTER TABLE changes ADD COLUMN at_ms BIGINT NOT NULL DEFAULT 0;

-- The feed's floor: the highest sequence ever pruned (0: nothing was). A
-- reader whose position is at or above it has every entry after its
-- position; one below it may have missed entries and must read everything
-- again. Raised in the same transaction as the delete it covers.
CREATE TABLE feed_floor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL
);
INSERT INTO feed_floor (id, seq) VALUES (1, 0);
