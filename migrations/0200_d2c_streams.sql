-- Device-to-cloud event streams.

-- Hub-wide stream settings, one row. The partition count is fixed when the database is created: the first hub to
-- start writes it, later hubs read it (a device's partition depends on it).
CREATE TABLE d2c_settings (
    id              smallint PRIMARY KEY CHECK (id = 1),
    partition_count integer NOT NULL CHECK (partition_count BETWEEN 1 AND 128),
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- One counter row per partition. Sequence numbers are taken from it inside the inserting transaction, and its row
-- lock, held until commit, makes commits on one partition happen in sequence order (readers never skip).
-- last_enqueued_at (NULL until the first event) keeps enqueued times non-decreasing along the sequence, even
-- across hub processes.
CREATE TABLE d2c_partitions (
    partition_id     integer PRIMARY KEY,
    next_seq         bigint NOT NULL DEFAULT 0,
    last_enqueued_at timestamptz
);

-- Consumer groups (small, hub-wide).
CREATE TABLE d2c_consumer_groups (
    name       text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO d2c_consumer_groups (name) VALUES ('$Default');

-- Server-side checkpoints: the last sequence number a group has processed, per partition.
CREATE TABLE d2c_checkpoints (
    partition_id   integer NOT NULL,
    consumer_group text NOT NULL REFERENCES d2c_consumer_groups (name) ON DELETE CASCADE,
    seq            bigint NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition_id, consumer_group)
);
