-- Per-device statements are prepared, and a prepared statement may run with a generic plan (PostgreSQL's own
-- choice after five executions, or forced by a pooler in transaction mode). A generic plan estimates
-- `device_id = $1` as 1 / (distinct device ids) from the table's statistics. Ended messages are kept for status
-- queries, so one busy device can fill most of the table: ANALYZE then counts a handful of distinct ids, the
-- per-device condition looks unselective, and the planner walks a hub-wide index (every device's live messages)
-- instead of the device's own live index. A device's rows are a small share of the table by design (bounded queue
-- depth, bounded retention), so the estimate is fixed here rather than sampled: distinct ids as 1 % of the rows.
ALTER TABLE c2d_messages ALTER COLUMN device_id SET (n_distinct = -0.01);
