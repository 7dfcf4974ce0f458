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

/// What carries the database's clock as of when it was read.
trait ReadAt {
    fn db_now(&self) -> i64;
}

impl ReadAt for DeviceCredentials {
    fn db_now(&self) -> i64 {
        self.db_now
    }
}

impl ReadAt for PolicyKeys {
    fn db_now(&self) -> i64 {
        self.db_now
    }
}

/// `key`'s entry of `map` while younger than `ttl` (its clock moved on by its age), else what `read` finds, cached
/// when it exists.
async fn cached<T: ReadAt, F, Fut>(
    map: &Map<T>,
    key: &str,
    ttl: Duration,
    read: F,
) -> Result<Fresh<T>, sqlx::Error>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, sqlx::Error>>,
{
    if let Some((value, age)) = map.get(key, ttl) {
        if let Some(found) = value.as_ref() {
            let db_now = found.db_now() + age.as_secs() as i64;
            return Ok(Fresh { value, db_now });
        }
    }
    let read = read().await?;
    let db_now = match &read {
        Some(found) => found.db_now(),
        None => chrono::Utc::now().timestamp(),
    };
    let value = Arc::new(read);
    if value.is_some() {
        map.put(key, value.clone());
    }
    Ok(Fresh { value, db_now })
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
        cached(&self.devices, device_id, self.ttl, || {
            store::credentials(&self.db, device_id)
        })
        .await
    }

    pub async fn policy(&self, name: &str) -> Result<Fresh<PolicyKeys>, sqlx::Error> {
        cached(&self.policies, name, self.ttl, || {
            policies::keys(&self.db, name)
        })
        .await
    }

    pub fn forget_device(&self, device_id: &str) {
        self.devices.forget(device_id);
    }

    pub fn forget_policy(&self, name: &str) {
        self.policies.forget(name);
    }
}
