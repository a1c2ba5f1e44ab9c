-- Meshes created before TrafficPermission existed get the `allow-all`
-- TrafficPermission that a new mesh gets when it is applied: agents refuse
-- every call that no TrafficPermission allows, so without it an upgrade
-- would cut every call in those meshes. A mesh that already has a
-- TrafficPermission is left as it is. Each insert is a change in the feed.
CREATE TEMP TABLE upgraded_meshes AS
    SELECT name, ROW_NUMBER() OVER (ORDER BY name) AS n
    FROM resources
    WHERE kind = 'Mesh'
      AND name NOT IN (SELECT mesh FROM resources WHERE kind = 'TrafficPermission');

INSERT INTO resources (kind, mesh, namespace, name, version, seq, body)
    SELECT 'TrafficPermission', name, '', 'allow-all', 1,
           (SELECT value FROM change_sequence) + n,
           '{"apiVersion":"weft.io/v1alpha1","kind":"TrafficPermission","metadata":{"name":"allow-all","mesh":"'
               || name
               || '"},"spec":{"targetRef":{"kind":"Mesh"},"rules":[{"from":{"kind":"Mesh"},"default":{"action":"Allow"}}]}}'
    FROM upgraded_meshes;

INSERT INTO changes (seq, kind, mesh, namespace, name, version, deleted)
    SELECT (SELECT value FROM change_sequence) + n, 'TrafficPermission', name, '', 'allow-all', 1, 0
    FROM upgraded_meshes;

UPDATE change_sequence SET value = value + (SELECT COUNT(*) FROM upgraded_meshes);

DROP TABLE upgraded_meshes;
