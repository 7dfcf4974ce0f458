//! The hub's heap follows what it holds, not how much it has done: answering requests must not leave memory
//! behind. This test binary counts every byte its process has allocated and not freed (hub and client share the
//! process), so it runs one test on its own.
//!
//! What it guards against was found by a ten-minute soak: the metrics recorder keeps every latency it is given
//! until the metrics are rendered, so a hub that nobody scraped grew by every request it answered.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// The system allocator, keeping count of the bytes allocated and not yet freed.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// `count` requests to a cheap route, 16 at a time on one client.
async fn answer_requests(hub: &TestHub, count: usize) {
    let url = format!("{}/health/live", hub.base);
    let workers = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (http, url) = (hub.http.clone(), url.clone());
        tasks.spawn(async move {
            for _ in 0..count / workers {
                let response = http.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answering_requests_leaves_no_memory_behind_when_nobody_scrapes_metrics() {
    let hub = TestHub::start().await;
    // Connections, pools and caches reach their working size first.
    answer_requests(&hub, 4_000).await;
    let before = live();

    // About 9 bytes per request stayed behind before the fix: 900 KB here, well above the margin.
    answer_requests(&hub, 100_000).await;
    let margin = 256 * 1024;
    let deadline = Instant::now() + iothub::http::metrics::UPKEEP_EVERY * 4;
    loop {
        let grown = live() - before;
        if grown < margin {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the heap grew by {grown} bytes over 100,000 requests and stayed so"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hub.shutdown().await;
}
