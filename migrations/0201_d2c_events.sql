-- The events themselves: an append-only log per partition, range-partitioned by enqueued time so retention drops
-- whole time partitions (created ahead and dropped by the hub's maintenance task) and never deletes rows.
CREATE TABLE d2c_events (
    partition_id      integer NOT NULL,
    seq               bigint NOT NULL,
    enqueued_at       timestamptz NOT NULL,
    device_id         text NOT NULL,
    -- system properties as the device sent them plus the hub's stamps (iothub-enqueuedtime excluded: enqueued_at)
    system_properties jsonb NOT NULL,
    -- application properties, prefix stripped
    properties        jsonb NOT NULL,
    body              bytea NOT NULL,
    PRIMARY KEY (partition_id, seq, enqueued_at)
) PARTITION BY RANGE (enqueued_at);
