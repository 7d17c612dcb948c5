-- Pruning by age finds the events older than a cut-off by bisection over the cursor (the
-- writer stamps events in cursor order): no event pays for an index on its time any more.
DROP INDEX events_created;
