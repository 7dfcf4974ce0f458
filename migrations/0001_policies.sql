-- Shared access policies: hub-wide, small (a reference table when distributed).
-- rights is a bit set: 1 RegistryRead, 2 RegistryWrite, 4 ServiceConnect, 8 DeviceConnect.
CREATE TABLE policies (
    name          text PRIMARY KEY,
    rights        smallint NOT NULL CHECK (rights > 0 AND rights < 16),
    primary_key   text NOT NULL,
    secondary_key text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
