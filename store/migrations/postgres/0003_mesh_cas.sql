-- Every CA of a mesh, for rotation: the one signing (exactly one once the
-- mesh has a CA), at most one pending (in the trust bundle, not yet
-- signing) and retired ones kept in the bundle until trusted_until (when
-- every certificate they signed has expired). Times are seconds since the
-- epoch; fingerprint is 'sha256:<hex of the DER>'; generation orders the
-- CAs of a mesh (and so the bundle) by when they were added.
CREATE TABLE mesh_cas (
    mesh TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    generation BIGINT NOT NULL,
    source TEXT NOT NULL,
    role TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    added_at BIGINT NOT NULL,
    signing_since BIGINT,
    trusted_until BIGINT,
    PRIMARY KEY (mesh, fingerprint)
);

-- Replicas racing to create or rotate a CA: the second insert conflicts.
CREATE UNIQUE INDEX mesh_cas_one_signing ON mesh_cas (mesh) WHERE role = 'signing';
CREATE UNIQUE INDEX mesh_cas_one_pending ON mesh_cas (mesh) WHERE role = 'pending';

-- The CAs (fingerprints, space-separated) in the trust bundle of the
-- config version the agent last acknowledged: the leader promotes a
-- pending CA once every online agent trusts it.
ALTER TABLE agents ADD COLUMN applied_cas TEXT NOT NULL DEFAULT '';
