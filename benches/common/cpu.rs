//! CPU time read from `/proc`: of the hub's runtime threads (named [`HUB_THREAD`]), told apart from the load
//! generator's in the same process, and of a local PostgreSQL server.

use std::time::Duration;

/// The hub's runtime threads carry this name, so their CPU time can be told from the load generator's.
pub const HUB_THREAD: &str = "hub";

/// Runs `run` on a runtime of its own for the load generator, handing it a runtime whose threads are named
/// [`HUB_THREAD`] for the hub: the hub launched there is metered apart from the load.
pub fn with_hub_runtime<F, Fut>(run: F) -> anyhow::Result<()>
where
    F: FnOnce(tokio::runtime::Handle) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let hub = tokio::runtime::Builder::new_multi_thread()
        .thread_name(HUB_THREAD)
        .enable_all()
        .build()?;
    let load = tokio::runtime::Builder::new_multi_thread()
        .thread_name("load")
        .enable_all()
        .build()?;
    load.block_on(run(hub.handle().clone()))
}

/// Fields of `/proc/<pid>/stat` (or of a thread's) that the meters need.
pub struct ProcStat {
    pub comm: String,
    pub ppid: u32,
    /// utime + stime
    pub cpu: u64,
    /// cutime + cstime: children that exited and were waited for
    pub children_cpu: u64,
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(ProcStat {
        comm: text[open + 1..close].to_string(),
        ppid: number(1)? as u32,
        cpu: number(11)? + number(12)?,
        children_cpu: number(13)? + number(14)?,
    })
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn ticks(n: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64(n as f64 / hz)
}

/// CPU time of this process's threads that belong to the hub's runtime.
pub fn hub_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let total = tasks
        .flatten()
        .filter_map(|t| parse_stat(&std::fs::read_to_string(t.path().join("stat")).ok()?))
        .filter(|s| s.comm.starts_with(HUB_THREAD))
        .map(|s| s.cpu)
        .sum();
    ticks(total)
}

/// CPU time of the PostgreSQL server: the postmaster, its live children, and its children that exited.
pub fn server_cpu(postmaster: u32) -> Duration {
    let own = proc_stat(postmaster).map_or(0, |s| s.cpu + s.children_cpu);
    let children: u64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| parse_stat(&std::fs::read_to_string(e.path().join("stat")).ok()?))
        .filter(|s| s.ppid == postmaster)
        .map(|s| s.cpu)
        .sum();
    ticks(own + children)
}
