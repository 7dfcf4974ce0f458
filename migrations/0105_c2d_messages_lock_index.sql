-- Settling and abandoning find a locked message by (device, lock token); receive asks for the device's earliest
-- lock deadline. Without an index of their own, a generic plan of those statements may walk the hub-wide lock index
-- (every device's locked messages) and filter by device. A lock token is unique within its device.
CREATE UNIQUE INDEX c2d_messages_lock_token ON c2d_messages (device_id, lock_token) WHERE state = 'invisible';
