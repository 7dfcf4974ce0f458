//! One LISTEN connection per hub process, fanned out to the requests waiting on it (long polls, event streams).
//!
//! A NOTIFY is always a statement of its own, never part of a query over a queue or stream table, nor a trigger:
//! once those tables are distributed, such a query runs on a worker node where no hub listens. Where a waiter waits
//! for nothing else (an MQTT connection for its C2D messages, event streams), the writer notifies inside the
//! transaction that makes the change visible ([`notify`]), so the notification is delivered exactly when it
//! commits. Where waiters look again by themselves within a bounded time (feedback long polls), the change stays a
//! single statement and the notification follows its commit ([`after_commit`]). Waiters [`Notifier::subscribe`] to a (channel, key) *before*
//! they look in the database, so a commit between the look and the wait still wakes them. Only keys that someone
//! waits on have an entry, so memory follows the number of waiters, not the traffic.
//!
//! The loop also keeps this process's credential cache coherent: every write that changes what authentication reads
//! commits through [`commit_credential_change`], whose notification on [`channel::CREDENTIALS`] evicts what it
//! names in every process (and wakes the device's connections, which look again whether they may stay).
//!
//! When the LISTEN connection drops, notifications sent meanwhile are lost: once it listens again, every waiter is
//! woken to look again and the credential cache is cleared.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgNotification};
use sqlx::{Executor, PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::postgres::literal;

/// The channels the hub uses. A payload is the key waiters subscribe to, or several keys one per line
/// ([`notify_and_commit`]; no key holds a line break: device ids and partition numbers cannot).
pub mod channel {
    /// C2D: a message became deliverable for each device named in the payload, one per line (a group commit of
    /// enqueues names several).
    pub const C2D: &str = "iothub_c2d";
    /// D2C: events were committed to the partition named in the payload.
    pub const D2C: &str = "iothub_d2c";
    /// Feedback: records became receivable (payload unused).
    pub const FEEDBACK: &str = "iothub_feedback";
    /// Sessions: a connection took the device named in the payload; its other connections check whether they
    /// still hold it.
    pub const SESSION: &str = "iothub_session";
    /// Credentials: a device or policy changed in a way authentication reads (payload a [`CredentialChange`]);
    /// a device's connections check whether they may stay, too.
    pub const CREDENTIALS: &str = "iothub_credentials";
    pub const ALL: [&str; 5] = [C2D, D2C, FEEDBACK, SESSION, CREDENTIALS];
}

/// What a write changed in a way authentication reads, as it travels on [`channel::CREDENTIALS`]: `device:<id>`
/// or `policy:<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialChange<'a> {
    Device(&'a str),
    Policy(&'a str),
}

impl<'a> CredentialChange<'a> {
    fn payload(&self) -> String {
        match self {
            CredentialChange::Device(id) => format!("device:{id}"),
            CredentialChange::Policy(name) => format!("policy:{name}"),
        }
    }

    /// `None` for a payload this version does not know (a newer hub's): the cache then forgets everything.
    fn parse(payload: &'a str) -> Option<CredentialChange<'a>> {
        match payload.split_once(':')? {
            ("device", id) => Some(CredentialChange::Device(id)),
            ("policy", name) => Some(CredentialChange::Policy(name)),
            _ => None,
        }
    }
}

/// A process's cache of what authentication reads, which the LISTEN loop keeps coherent.
pub trait CredentialCache: Send + Sync {
    fn forget(&self, change: CredentialChange<'_>);
    /// Notifications may have been lost.
    fn clear(&self);
}

/// Commits `tx`, which made `change`, with a notification of it as a statement of its own (the transaction's only
/// one): every hub process's `cache` forgets what `change` names once it commits; this one's at once.
pub async fn commit_credential_change(
    mut tx: Transaction<'_, Postgres>,
    cache: &dyn CredentialCache,
    change: CredentialChange<'_>,
) -> Result<(), sqlx::Error> {
    notify(&mut tx, channel::CREDENTIALS, &change.payload()).await?;
    tx.commit().await?;
    cache.forget(change);
    Ok(())
}

type Key = (String, String);

#[derive(Clone, Default)]
pub struct Notifier {
    waiters: Arc<Mutex<HashMap<Key, watch::Sender<u64>>>>,
    /// Bumped on every reconnect: a wake-up for every waiter.
    epoch: Arc<watch::Sender<u64>>,
}

/// A registration for wake-ups on one (channel, key); drop it to unregister.
pub struct Subscription {
    notifier: Notifier,
    key: Key,
    receiver: watch::Receiver<u64>,
    epoch: watch::Receiver<u64>,
}

impl Subscription {
    /// Resolves at the next notification for this key (or reconnect) after the subscription was made or after
    /// the previous `changed()` returned.
    pub async fn changed(&mut self) {
        tokio::select! {
            _ = self.receiver.changed() => {}
            _ = self.epoch.changed() => {}
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut waiters = self.notifier.waiters.lock().unwrap();
        if let Some(sender) = waiters.get(&self.key) {
            // Our receiver is still alive here, so "only us" is a count of 1.
            if sender.receiver_count() <= 1 {
                waiters.remove(&self.key);
            }
        }
    }
}

impl Notifier {
    pub fn subscribe(&self, channel: &str, key: &str) -> Subscription {
        let key = (channel.to_string(), key.to_string());
        let receiver = {
            let mut waiters = self.waiters.lock().unwrap();
            waiters
                .entry(key.clone())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe()
        };
        Subscription {
            notifier: self.clone(),
            key,
            receiver,
            epoch: self.epoch.subscribe(),
        }
    }

    /// Subscriptions on (channel, key) right now: requests registered for a wake-up that have not answered yet.
    /// Tests read it to know a long poll is waiting before they commit what it waits for.
    pub fn waiting(&self, channel: &str, key: &str) -> usize {
        let waiters = self.waiters.lock().unwrap();
        waiters
            .get(&(channel.to_string(), key.to_string()))
            .map_or(0, |sender| sender.receiver_count())
    }

    fn wake(&self, channel: &str, key: &str) {
        let waiters = self.waiters.lock().unwrap();
        if let Some(sender) = waiters.get(&(channel.to_string(), key.to_string())) {
            sender.send_modify(|n| *n += 1);
        }
    }

    /// Wakes every key a payload names (one per line).
    fn wake_named(&self, channel: &str, payload: &str) {
        for key in payload.split('\n') {
            self.wake(channel, key);
        }
    }

    fn wake_all(&self) {
        self.epoch.send_modify(|n| *n += 1);
    }

    /// Starts the LISTEN loop on `pool` in `tasks`, keeping `credentials` coherent; it runs until `shutdown` turns
    /// true.
    pub async fn start(
        pool: PgPool,
        credentials: Arc<dyn CredentialCache>,
        mut shutdown: watch::Receiver<bool>,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> anyhow::Result<Notifier> {
        let notifier = Notifier::default();
        let mut listener = listen(&pool).await?;
        let this = notifier.clone();
        tasks.spawn(async move {
            loop {
                let received = tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                    received = listener.try_recv() => received,
                };
                match received {
                    Ok(Some(n)) => this.deliver(&n, &*credentials),
                    // The connection dropped and sqlx listens again on a new one before it answers `None`.
                    Ok(None) => this.missed(&*credentials),
                    Err(error) => {
                        tracing::warn!(%error, "LISTEN connection failed; reconnecting");
                        match relisten(&pool, &mut shutdown).await {
                            Some(again) => listener = again,
                            None => return Ok(()),
                        }
                        this.missed(&*credentials);
                    }
                }
            }
        });
        Ok(notifier)
    }

    fn deliver(&self, n: &PgNotification, credentials: &dyn CredentialCache) {
        if n.channel() != channel::CREDENTIALS {
            return self.wake_named(n.channel(), n.payload());
        }
        // Evicted before the wake-up, so a connection that looks again reads the change.
        let change = CredentialChange::parse(n.payload());
        match change {
            Some(change) => credentials.forget(change),
            None => credentials.clear(),
        }
        if let Some(CredentialChange::Device(id)) = change {
            self.wake(channel::SESSION, id);
        }
    }

    /// Notifications were lost while the connection was down; called once it listens again, so that nothing
    /// committed after this goes unheard: what was cached may be stale, and every waiter looks again.
    fn missed(&self, credentials: &dyn CredentialCache) {
        credentials.clear();
        self.wake_all();
    }
}

/// A new connection that listens on every channel.
async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all(channel::ALL).await?;
    Ok(listener)
}

/// [`listen`], retried every 500 ms until it works (`None`: shutdown came first). A fresh listener rather than the
/// failed one: its connection may be dead without sqlx knowing.
async fn relisten(pool: &PgPool, shutdown: &mut watch::Receiver<bool>) -> Option<PgListener> {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        match listen(pool).await {
            Ok(listener) => return Some(listener),
            Err(error) => tracing::warn!(%error, "LISTEN connection failed; retrying"),
        }
    }
}

/// Sends a notification as its own statement in `tx`; it is delivered when (and only if) `tx` commits.
/// Call it at most once per transaction.
pub async fn notify(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    channel: &str,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(key)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Sends one notification on `channel` naming every one of `keys`, one per line (each is woken as if notified
/// alone; a transaction sends at most one; PostgreSQL limits a payload to 8000 bytes, so callers bound how many keys
/// they name), and commits, in one round trip: both statements go as text in one simple query (which binds nothing,
/// so the payload is quoted as a literal) on `connection`, whose transaction the caller opened with a raw `BEGIN`.
/// With no keys it only commits. An error means the commit's outcome is unknown.
pub async fn notify_and_commit(
    connection: &mut PgConnection,
    channel: &str,
    keys: &[&str],
) -> Result<(), sqlx::Error> {
    let sql = if keys.is_empty() {
        "COMMIT".to_string()
    } else {
        format!(
            "SELECT pg_notify({}, {}); COMMIT",
            literal(channel),
            literal(&keys.join("\n"))
        )
    };
    // Text with no parameters goes as a simple query, which may hold several statements.
    connection.execute(sql.as_str()).await?;
    Ok(())
}

/// Sends a notification as a statement of its own after the change it announces has committed: for waiters that
/// look again by themselves within a bounded time (long polls), where a change's own statement should stay one
/// round trip. If the process dies between the commit and this, those waiters find the change when their wait ends.
pub async fn after_commit<'c>(
    db: impl Executor<'c, Database = Postgres>,
    channel: &str,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(key)
        .execute(db)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_payloads_round_trip_and_unknown_ones_are_none() {
        for change in [
            CredentialChange::Device("a:b"),
            CredentialChange::Policy("iothubowner"),
        ] {
            assert_eq!(CredentialChange::parse(&change.payload()), Some(change));
        }
        assert_eq!(CredentialChange::parse("twin:a"), None);
        assert_eq!(CredentialChange::parse("device"), None);
    }

    #[tokio::test]
    async fn a_payload_of_several_lines_wakes_each_key_it_names() {
        let notifier = Notifier::default();
        let mut a = notifier.subscribe(channel::C2D, "a");
        let mut b = notifier.subscribe(channel::C2D, "b");
        let mut c = notifier.subscribe(channel::C2D, "c");
        notifier.wake_named(channel::C2D, "a\nc");
        for (name, woken) in [("a", &mut a), ("c", &mut c)] {
            tokio::time::timeout(Duration::from_millis(100), woken.changed())
                .await
                .unwrap_or_else(|_| panic!("{name} woken"));
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(50), b.changed())
                .await
                .is_err(),
            "b is not named"
        );
    }

    #[tokio::test]
    async fn wakes_only_the_matching_key_and_cleans_up() {
        let notifier = Notifier::default();
        let mut a = notifier.subscribe(channel::C2D, "a");
        let mut b = notifier.subscribe(channel::C2D, "b");
        notifier.wake(channel::C2D, "a");
        tokio::time::timeout(Duration::from_millis(100), a.changed())
            .await
            .expect("a woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), b.changed())
                .await
                .is_err(),
            "b must not wake"
        );
        notifier.wake_all();
        tokio::time::timeout(Duration::from_millis(100), b.changed())
            .await
            .expect("b woken by reconnect");
        assert_eq!(notifier.waiting(channel::C2D, "a"), 1);
        assert_eq!(notifier.waiting(channel::C2D, "c"), 0);
        drop(a);
        assert_eq!(notifier.waiting(channel::C2D, "a"), 0);
        drop(b);
        assert!(notifier.waiters.lock().unwrap().is_empty());
    }
}
