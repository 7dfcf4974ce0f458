//! Where authentication finds keys: the database, through a short-lived cache.
//!
//! Without it every request would cost one more database round trip than its work needs. Entries live for a
//! configurable time (default 1 s, 0 disables it); writes made through this process (key rotation, disabling or
//! deleting a device, changing a policy) evict their entry at once, and other hub processes see them within that time.
//! Only names that exist are cached, so a device created by another process is usable at once. The map is bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::policies::{self, PolicyKeys};
use crate::registry::store::{self, DeviceCredentials};

const MAX_ENTRIES: usize = 100_000;

struct Entry<T> {
    fetched: Instant,
    value: Arc<Option<T>>,
}

struct Map<T>(Mutex<HashMap<String, Entry<T>>>);

impl<T> Map<T> {
    fn new() -> Self {
        Map(Mutex::new(HashMap::new()))
    }
    fn get(&self, key: &str, ttl: Duration) -> Option<(Arc<Option<T>>, Duration)> {
        let map = self.0.lock().unwrap();
        let entry = map.get(key)?;
        let age = entry.fetched.elapsed();
        (age < ttl).then(|| (entry.value.clone(), age))
    }
    fn put(&self, key: &str, value: Arc<Option<T>>) {
        let mut map = self.0.lock().unwrap();
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(
            key.to_string(),
            Entry {
                fetched: Instant::now(),
                value,
            },
        );
    }
    fn forget(&self, key: &str) {
        self.0.lock().unwrap().remove(key);
    }
}

/// Keys and statuses of devices and policies, with the database's clock as of when they were read.
pub struct Credentials {
    db: PgPool,
    ttl: Duration,
    devices: Map<DeviceCredentials>,
    policies: Map<PolicyKeys>,
}

/// A value read from the database, and the database's clock now (in Unix seconds).
pub struct Fresh<T> {
    pub value: Arc<Option<T>>,
    pub db_now: i64,
}

impl Credentials {
    pub fn new(db: PgPool, ttl: Duration) -> Credentials {
        Credentials {
            db,
            ttl,
            devices: Map::new(),
            policies: Map::new(),
        }
    }

    /// Always reads the database.
    pub fn uncached(db: PgPool) -> Credentials {
        Credentials::new(db, Duration::ZERO)
    }

    pub async fn device(&self, device_id: &str) -> Result<Fresh<DeviceCredentials>, sqlx::Error> {
        if let Some((value, age)) = self.devices.get(device_id, self.ttl) {
            if let Some(device) = value.as_ref() {
                let db_now = device.db_now + age.as_secs() as i64;
                return Ok(Fresh { value, db_now });
            }
        }
        let read = store::credentials(&self.db, device_id).await?;
        let db_now = match &read {
            Some(device) => device.db_now,
            None => chrono::Utc::now().timestamp(),
        };
        let value = Arc::new(read);
        if value.is_some() {
            self.devices.put(device_id, value.clone());
        }
        Ok(Fresh { value, db_now })
    }

    pub async fn policy(&self, name: &str) -> Result<Fresh<PolicyKeys>, sqlx::Error> {
        if let Some((value, age)) = self.policies.get(name, self.ttl) {
            if let Some(policy) = value.as_ref() {
                let db_now = policy.db_now + age.as_secs() as i64;
                return Ok(Fresh { value, db_now });
            }
        }
        let read = policies::keys(&self.db, name).await?;
        let db_now = match &read {
            Some(policy) => policy.db_now,
            None => chrono::Utc::now().timestamp(),
        };
        let value = Arc::new(read);
        if value.is_some() {
            self.policies.put(name, value.clone());
        }
        Ok(Fresh { value, db_now })
    }

    pub fn forget_device(&self, device_id: &str) {
        self.devices.forget(device_id);
    }

    pub fn forget_policy(&self, name: &str) {
        self.policies.forget(name);
    }
}
