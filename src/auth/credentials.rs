//! Where authentication finds keys: the database, through a cache that every hub process keeps coherent.
//!
//! Without it every request would cost one more database round trip than its work needs. Every write that changes
//! what authentication reads (a device's keys or status, a device or policy deleted, a policy's keys or rights)
//! commits through [`notify::commit_credential_change`]: a notification inside the write's transaction, the entry
//! forgotten here once it commits, and in every other process when the notification arrives. Entries therefore live
//! long (`IOTHUB_AUTH_CACHE_MS`, 60 s by default): the lifetime only bounds how stale an entry can be when a
//! notification is lost, which the LISTEN loop answers by clearing everything once it listens again. Only names
//! that exist are cached, so a device or policy created anywhere is usable at once and creating one needs no
//! notification.
//!
//! A read that started before a change committed must not store what it found after the change's notification
//! was handled: each map counts its evictions, and a read stores its result only if none happened since it began.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::policies::{self, PolicyKeys};
#[cfg(doc)]
use crate::notify;
use crate::notify::{CredentialCache, CredentialChange};
use crate::registry::store::{self, DeviceCredentials};

/// A hard bound on each map, whatever the traffic.
const MAX_ENTRIES: usize = 100_000;

struct Entry<T> {
    fetched: Instant,
    value: Arc<Option<T>>,
}

struct Inner<T> {
    entries: HashMap<String, Entry<T>>,
    /// Bumped by every eviction: a read that began under another count may hold what an eviction removed.
    evictions: u64,
    swept: Instant,
}

struct Map<T>(Mutex<Inner<T>>);

impl<T> Map<T> {
    fn new() -> Self {
        Map(Mutex::new(Inner {
            entries: HashMap::new(),
            evictions: 0,
            swept: Instant::now(),
        }))
    }

    fn get(&self, key: &str, ttl: Duration) -> Option<(Arc<Option<T>>, Duration)> {
        let inner = self.0.lock().unwrap();
        let entry = inner.entries.get(key)?;
        let age = entry.fetched.elapsed();
        (age < ttl).then(|| (entry.value.clone(), age))
    }

    /// The eviction count to hand to [`Map::put`]; taken before the read it guards.
    fn evictions(&self) -> u64 {
        self.0.lock().unwrap().evictions
    }

    /// Stores `value` unless an eviction happened since `evictions` was taken. Expired entries are dropped once per
    /// `ttl`, so the map follows recent traffic; when it is full even so, an arbitrary entry makes room.
    fn put(&self, key: &str, value: Arc<Option<T>>, evictions: u64, ttl: Duration) {
        let mut inner = self.0.lock().unwrap();
        if inner.evictions != evictions {
            return;
        }
        let now = Instant::now();
        if now.duration_since(inner.swept) >= ttl {
            inner
                .entries
                .retain(|_, e| now.duration_since(e.fetched) < ttl);
            inner.swept = now;
        }
        if inner.entries.len() >= MAX_ENTRIES {
            if let Some(victim) = inner.entries.keys().next().cloned() {
                inner.entries.remove(&victim);
            }
        }
        inner.entries.insert(
            key.to_string(),
            Entry {
                fetched: now,
                value,
            },
        );
    }

    fn forget(&self, key: &str) {
        let mut inner = self.0.lock().unwrap();
        inner.evictions += 1;
        inner.entries.remove(key);
    }

    fn clear(&self) {
        let mut inner = self.0.lock().unwrap();
        inner.evictions += 1;
        inner.entries = HashMap::new();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().entries.len()
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
    kind: &'static str,
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
            metrics::counter!("iothub_auth_cache_lookups_total", "kind" => kind, "outcome" => "hit")
                .increment(1);
            let db_now = found.db_now() + age.as_secs() as i64;
            return Ok(Fresh { value, db_now });
        }
    }
    metrics::counter!("iothub_auth_cache_lookups_total", "kind" => kind, "outcome" => "miss")
        .increment(1);
    let evictions = map.evictions();
    let read = read().await?;
    let db_now = match &read {
        Some(found) => found.db_now(),
        None => chrono::Utc::now().timestamp(),
    };
    let value = Arc::new(read);
    if value.is_some() && !ttl.is_zero() {
        map.put(key, value.clone(), evictions, ttl);
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
        cached(&self.devices, "device", device_id, self.ttl, || {
            store::credentials(&self.db, device_id)
        })
        .await
    }

    pub async fn policy(&self, name: &str) -> Result<Fresh<PolicyKeys>, sqlx::Error> {
        cached(&self.policies, "policy", name, self.ttl, || {
            policies::keys(&self.db, name)
        })
        .await
    }
}

impl CredentialCache for Credentials {
    fn forget(&self, change: CredentialChange<'_>) {
        match change {
            CredentialChange::Device(id) => self.devices.forget(id),
            CredentialChange::Policy(name) => self.policies.forget(name),
        }
    }

    fn clear(&self) {
        self.devices.clear();
        self.policies.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn a_read_that_began_before_an_eviction_is_not_stored() {
        let map = Map::<u8>::new();
        let before = map.evictions();
        map.forget("a");
        map.put("a", Arc::new(Some(1)), before, TTL);
        assert!(map.get("a", TTL).is_none());
        map.put("a", Arc::new(Some(2)), map.evictions(), TTL);
        assert_eq!(*map.get("a", TTL).unwrap().0, Some(2));
        let before = map.evictions();
        map.clear();
        map.put("b", Arc::new(Some(3)), before, TTL);
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn expired_entries_are_dropped_and_the_bound_holds() {
        let map = Map::<u8>::new();
        let ttl = Duration::from_millis(20);
        map.put("old", Arc::new(Some(1)), 0, ttl);
        std::thread::sleep(ttl);
        map.put("new", Arc::new(Some(2)), 0, ttl);
        assert_eq!(map.len(), 1, "the expired entry went at the next put");
        for i in 0..MAX_ENTRIES + 10 {
            map.put(&i.to_string(), Arc::new(Some(0)), 0, TTL);
        }
        assert_eq!(map.len(), MAX_ENTRIES);
    }
}
