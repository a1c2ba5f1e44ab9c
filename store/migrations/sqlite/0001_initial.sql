-- The single-row counter that orders every change. Each write transaction
-- bumps it first, which takes SQLite's write lock up front (no lock upgrade
-- between readers) and gives every change its place in the feed.
CREATE TABLE change_sequence (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO change_sequence (id, value) VALUES (1, 0);

-- One row per live resource; mesh and namespace are '' where the kind has
-- none, so that the key has no NULLs.
CREATE TABLE resources (
    kind TEXT NOT NULL,
    mesh TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, mesh, namespace, name)
);

-- The change feed: one row per put or delete, in sequence order.
CREATE TABLE changes (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    mesh TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    deleted BOOLEAN NOT NULL
);

CREATE TABLE bootstrap_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 BLOB NOT NULL,
    mesh TEXT NOT NULL,
    zone TEXT NOT NULL,
    workloads TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    max_uses INTEGER NOT NULL,
    uses INTEGER NOT NULL,
    revoked BOOLEAN NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE ca_material (
    mesh TEXT PRIMARY KEY,
    cert_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE virtual_ips (
    service TEXT PRIMARY KEY,
    ip TEXT NOT NULL UNIQUE
);
