-- When and why an agent left the zone's endpoint lists (NULL while it has
-- not): a goodbye (its stream closed cleanly), its token revoked, or not
-- seen for the agent grace. Its next accepted Hello clears them.
ALTER TABLE agents ADD COLUMN left_at INTEGER;
ALTER TABLE agents ADD COLUMN left_reason TEXT;

-- Workloads of the agent that the operator deleted ("mesh/namespace/name",
-- space-separated): the agent may not register them again until it enrols
-- again, and gets no certificate for them.
ALTER TABLE agents ADD COLUMN withdrawn TEXT NOT NULL DEFAULT '';
