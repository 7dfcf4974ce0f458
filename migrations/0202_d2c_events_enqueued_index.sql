-- Reads positioned by enqueued time (`from-enqueued-time=`).
CREATE INDEX d2c_events_by_time ON d2c_events (partition_id, enqueued_at);
