-- A device's MQTT connection, as the registry shows it and as take-over needs it: the connection that holds the
-- device (a random id per connection; another process seeing a different id closes its own), the state IoT Hub
-- reports, and whether a persistent session (CleanSession 0) keeps the device's C2D subscription.
ALTER TABLE devices
    ADD COLUMN connection_id                 uuid,
    ADD COLUMN connection_state              text NOT NULL DEFAULT 'Disconnected'
        CHECK (connection_state IN ('Connected', 'Disconnected')),
    ADD COLUMN connection_state_updated_time timestamptz,
    ADD COLUMN session_c2d_subscribed        boolean NOT NULL DEFAULT false;
