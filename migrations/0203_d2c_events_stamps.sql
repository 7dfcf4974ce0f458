-- The hub's stamps on every message, in columns of their own: as JSON among the system properties they were most of
-- a row, the same for every message of a device. `iothub-connection-device-id` is device_id, and
-- `iothub-message-source` is always Telemetry; readers add all four back. Events written before this migration keep
-- them among their system properties and have NULL here.
ALTER TABLE d2c_events
    ADD COLUMN auth_generation_id text,
    ADD COLUMN auth_scope text;
-- NOT VALID: checked for every row written from now on, without reading the rows already stored (all NULL here)
-- under the table's lock, which on a large stream would hold up ingestion for the length of a full scan.
ALTER TABLE d2c_events
    ADD CONSTRAINT d2c_events_auth_scope CHECK (auth_scope IN ('device', 'hub')) NOT VALID,
    ADD CONSTRAINT d2c_events_stamps_together CHECK ((auth_generation_id IS NULL) = (auth_scope IS NULL)) NOT VALID;
