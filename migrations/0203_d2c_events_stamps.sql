-- The hub's stamps on every message, in columns of their own: as JSON among the system properties they were most of
-- a row, the same for every message of a device. `iothub-connection-device-id` is device_id, and
-- `iothub-message-source` is always Telemetry; readers add all four back. Events written before this migration keep
-- them among their system properties and have NULL here.
ALTER TABLE d2c_events
    ADD COLUMN auth_generation_id text,
    ADD COLUMN auth_scope text CHECK (auth_scope IN ('device', 'hub')),
    ADD CHECK ((auth_generation_id IS NULL) = (auth_scope IS NULL));
