-- Claims, settlement and queue listings walk one device's live messages in sequence order.
CREATE INDEX c2d_messages_live ON c2d_messages (device_id, seq) WHERE state IN ('enqueued', 'invisible');
-- The expiry sweep: live messages by expiry time.
CREATE INDEX c2d_messages_expiry ON c2d_messages (expires_at) WHERE state IN ('enqueued', 'invisible');
-- The lock sweep: locked messages by lock deadline (dead-lettering after the last delivery's lock ran out).
CREATE INDEX c2d_messages_locks ON c2d_messages (locked_until) WHERE state = 'invisible';
-- The retention sweep: ended messages by the time they ended.
CREATE INDEX c2d_messages_ended ON c2d_messages (outcome_at) WHERE state IN ('completed', 'dead_lettered', 'purged');
