-- The agent inventory: one row per enrolled agent of a zone. last_seen is
-- in milliseconds since the epoch; connected_replica is the controller
-- replica holding the agent's config stream (NULL when none does).
CREATE TABLE agents (
    zone TEXT NOT NULL,
    name TEXT NOT NULL,
    mesh TEXT NOT NULL,
    hbone_address TEXT NOT NULL,
    host_facts TEXT NOT NULL,
    token_id TEXT NOT NULL,
    connected_replica TEXT,
    last_seen BIGINT NOT NULL,
    applied_version TEXT NOT NULL,
    nack_version TEXT,
    nack_reason TEXT,
    enrolled_at BIGINT NOT NULL,
    PRIMARY KEY (zone, name)
);
