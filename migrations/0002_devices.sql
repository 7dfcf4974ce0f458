-- Device identities (the registry). Distributed by device_id when the hub runs on Citus.
CREATE TABLE devices (
    device_id            text PRIMARY KEY,
    generation_id        text NOT NULL,
    -- the etag is base64 of this counter; it starts at a random value so a re-created device never reuses one
    etag_version         bigint NOT NULL,
    status               text NOT NULL CHECK (status IN ('enabled', 'disabled')),
    status_reason        text,
    status_updated_time  timestamptz,
    auth_type            text NOT NULL CHECK (auth_type IN ('sas', 'selfSigned', 'certificateAuthority', 'none')),
    primary_key          text,
    secondary_key        text,
    primary_thumbprint   text,
    secondary_thumbprint text,
    iot_edge             boolean NOT NULL DEFAULT false,
    last_activity_time   timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now()
);
