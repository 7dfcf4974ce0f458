-- The service's feedback queue: hub-wide, so tables of its own. Records are handed out in leased batches.
CREATE TABLE feedback_batches (
    batch_id       uuid PRIMARY KEY,
    lock_token     uuid NOT NULL,
    locked_until   timestamptz NOT NULL,
    -- receives of this batch so far
    delivery_count integer NOT NULL,
    created_at     timestamptz NOT NULL
);

-- One record per message outcome the sender asked to hear about. Keyed like the message it reports on; the
-- generation keeps records of a deleted device apart from those of a new device with the same id.
CREATE TABLE feedback_records (
    device_id            text NOT NULL,
    device_generation_id text NOT NULL,
    seq                  bigint NOT NULL,
    original_message_id  text NOT NULL,
    status_code          text NOT NULL CHECK (status_code IN ('Success', 'Expired', 'DeliveryCountExceeded', 'Rejected', 'Purged')),
    description          text NOT NULL,
    created_at           timestamptz NOT NULL,
    expires_at           timestamptz NOT NULL,
    batch_id             uuid REFERENCES feedback_batches (batch_id) ON DELETE CASCADE,
    PRIMARY KEY (device_id, device_generation_id, seq)
);
