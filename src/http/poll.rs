//! The one long-poll loop: look, and when nothing is there, wait for a wake-up (a commit the notifier reports, a
//! lease running out, or the hub stopping) and look again, until the wait is over.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::error::ApiResult;
use super::params::LongPoll;
use super::AppState;

/// What one look found.
pub enum Look<T> {
    Found(T),
    /// Nothing yet; `retry_in`: when a lease of something waiting runs out (look again then), if any.
    Empty {
        retry_in: Option<Duration>,
    },
}

/// Looks with `look` until it finds something or `wait` is over (`None`: nothing came). Subscribes to `channel` and
/// `key` before the first look, so a commit between a look and the wait still wakes it.
pub async fn long_poll<T, F, Fut>(
    state: &AppState,
    wait: LongPoll,
    channel: &str,
    key: &str,
    mut look: F,
) -> ApiResult<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ApiResult<Look<T>>>,
{
    let deadline = Instant::now() + wait.0;
    let mut subscription = wait.waits().then(|| state.notifier.subscribe(channel, key));
    let mut shutdown = state.shutdown.clone();
    loop {
        let retry_in = match look().await? {
            Look::Found(found) => return Ok(Some(found)),
            Look::Empty { retry_in } => retry_in,
        };
        let now = Instant::now();
        let Some(subscription) = subscription.as_mut().filter(|_| now < deadline) else {
            return Ok(None);
        };
        let until = match retry_in {
            Some(r) => deadline.min(now + r + Duration::from_millis(10)),
            None => deadline,
        };
        tokio::select! {
            _ = subscription.changed() => {}
            _ = tokio::time::sleep_until(until) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(None),
        }
    }
}
