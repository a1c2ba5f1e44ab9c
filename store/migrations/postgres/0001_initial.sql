-- The single-row counter that orders every change. Each write transaction
-- bumps it first and so holds its row lock until commit: transactions that
-- write changes commit in sequence order, so a reader of the feed never sees
-- seq N+1 before N (which a plain SEQUENCE would allow).
CREATE TABLE change_sequence (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO change_sequence (id, value) VALUES (1, 0);

-- One row per live resource; mesh and namespace are '' where the kind has
-- none, so that the key has no NULLs.
CREATE TABLE resources (
    kind TEXT NOT NULL,
    mesh TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    body JSONB NOT NULL,
    PRIMARY KEY (kind, mesh, namespace, name)
);

-- The change feed: one row per put or delete, in sequence order.
CREATE TABLE changes (
    seq BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    mesh TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL
);

-- Every replica LISTENs on weft_changes; the notification is sent at commit.
CREATE FUNCTION weft_notify_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('weft_changes', NEW.seq::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER changes_notify AFTER INSERT ON changes
    FOR EACH ROW EXECUTE FUNCTION weft_notify_change();

CREATE TABLE bootstrap_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 BYTEA NOT NULL,
    mesh TEXT NOT NULL,
    zone TEXT NOT NULL,
    workloads TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    max_uses BIGINT NOT NULL,
    uses BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE ca_material (
    mesh TEXT PRIMARY KEY,
    cert_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE virtual_ips (
    service TEXT PRIMARY KEY,
    ip TEXT NOT NULL UNIQUE
);
