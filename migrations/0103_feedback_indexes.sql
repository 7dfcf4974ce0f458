-- New batches take the oldest records not yet in a batch.
CREATE INDEX feedback_records_unbatched ON feedback_records (created_at) WHERE batch_id IS NULL;
-- A batch's records (reading it, and the cascade when it is completed or discarded).
CREATE INDEX feedback_records_batch ON feedback_records (batch_id) WHERE batch_id IS NOT NULL;
-- The retention sweep.
CREATE INDEX feedback_records_expiry ON feedback_records (expires_at);
-- Batches whose lease ran out are received again first.
CREATE INDEX feedback_batches_lease ON feedback_batches (locked_until);
-- Completing and abandoning find a batch by its lock token.
CREATE UNIQUE INDEX feedback_batches_lock_token ON feedback_batches (lock_token);
