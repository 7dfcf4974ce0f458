-- Cloud-to-device messages: one queue per device, ordered by a per-device counter kept on the device's row.
-- The device row is also the lock that serialises enqueues (queue depth, sequence numbers) for that device.
ALTER TABLE devices ADD COLUMN c2d_next_seq bigint NOT NULL DEFAULT 1;

-- A message stays here after it ended (completed, dead-lettered, purged) for as long as feedback is kept, so the
-- service can read its outcome; the clean-up task deletes it afterwards.
CREATE TABLE c2d_messages (
    device_id            text NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    seq                  bigint NOT NULL,
    device_generation_id text NOT NULL,
    message_id           text NOT NULL,
    correlation_id       text,
    user_id              text,
    ack                  text NOT NULL CHECK (ack IN ('none', 'positive', 'negative', 'full')),
    content_type         text,
    content_encoding     text,
    -- [[name, value], ...]: names keep their case and the order they were sent in
    app_properties       jsonb NOT NULL DEFAULT '[]',
    body                 bytea NOT NULL,
    enqueued_at          timestamptz NOT NULL,
    -- the sender's absolute expiry (echoed as iothub-expiry); NULL when the default TTL applies
    expiry_explicit      timestamptz,
    expires_at           timestamptz NOT NULL,
    state                text NOT NULL CHECK (state IN ('enqueued', 'invisible', 'completed', 'dead_lettered', 'purged')),
    lock_token           uuid,
    locked_until         timestamptz,
    -- deliveries so far: every delivery counts, including those whose lock expired
    delivery_count       integer NOT NULL DEFAULT 0,
    outcome              text CHECK (outcome IN ('Success', 'Expired', 'DeliveryCountExceeded', 'Rejected', 'Purged')),
    outcome_at           timestamptz,
    PRIMARY KEY (device_id, seq),
    CHECK ((state IN ('enqueued', 'invisible')) = (outcome IS NULL))
);
