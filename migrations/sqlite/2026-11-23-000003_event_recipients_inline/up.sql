-- Recipients of a private event live on the event row as ",a,b," (entity ids never contain a
-- comma): one row per event instead of one per recipient, which was most of the writer's
-- work per event. Replay filters with instr() over at most its replay budget.
ALTER TABLE events ADD COLUMN recipients TEXT;
UPDATE events SET recipients = (
    SELECT ',' || group_concat(r.entity_id, ',') || ','
    FROM event_recipients r
    WHERE r.workspace_id = events.workspace_id AND r.cursor = events.cursor
) WHERE is_private;
UPDATE events SET recipients = ',,' WHERE is_private AND recipients IS NULL;
DROP TABLE event_recipients;
