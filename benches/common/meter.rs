//! What a phase of a benchmark cost, per message: WAL bytes, statements, hub CPU and database CPU, read before and
//! after the phase from the database it ran on and from `/proc`.

use std::time::Duration;

use sqlx::PgPool;

use super::cpu::{hub_cpu, proc_stat, server_cpu};

/// Where the cost of a phase is read from.
pub struct Meter {
    db: PgPool,
    pg_stat_statements: bool,
    postmaster: Option<u32>,
}

/// The counters at one moment.
pub struct Snapshot {
    wal: i64,
    statements: i64,
    hub_cpu: Duration,
    db_cpu: Option<Duration>,
}

/// A phase's cost divided by the messages (or cycles) it moved.
pub struct Cost {
    pub wal_bytes: f64,
    pub statements: f64,
    pub hub_us: f64,
    /// None when the server does not run on this machine.
    pub db_us: Option<f64>,
}

impl Meter {
    pub async fn new(db: &PgPool) -> anyhow::Result<Meter> {
        let pg_stat_statements = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(db)
            .await
            .is_ok()
            && sqlx::query("SELECT 1 FROM pg_stat_statements LIMIT 1")
                .execute(db)
                .await
                .is_ok();
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(db)
            .await?;
        // The server's processes can be read only when it runs on this machine.
        let postmaster = proc_stat(backend as u32).map(|s| s.ppid);
        Ok(Meter {
            db: db.clone(),
            pg_stat_statements,
            postmaster,
        })
    }

    pub fn pg_stat_statements(&self) -> bool {
        self.pg_stat_statements
    }

    pub fn statements_source(&self) -> &'static str {
        if self.pg_stat_statements {
            "pg_stat_statements"
        } else {
            "committed transactions (pg_stat_statements not loaded)"
        }
    }

    /// Forgets the statements counted so far (seeding, an earlier phase), then takes a snapshot.
    pub async fn start(&self) -> anyhow::Result<Snapshot> {
        if self.pg_stat_statements {
            sqlx::query("SELECT pg_stat_statements_reset()")
                .execute(&self.db)
                .await?;
        }
        self.snapshot().await
    }

    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let statements: i64 = if self.pg_stat_statements {
            sqlx::query_scalar(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&self.db)
            .await?
        } else {
            // Backends report their counters when idle, within a second.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            sqlx::query_scalar(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()",
            )
            .fetch_one(&self.db)
            .await?
        };
        let wal: i64 =
            sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
                .fetch_one(&self.db)
                .await?;
        Ok(Snapshot {
            wal,
            statements,
            hub_cpu: hub_cpu(),
            db_cpu: self.postmaster.map(server_cpu),
        })
    }

    /// What happened since `before`, per one of `n` messages.
    pub async fn cost(&self, before: &Snapshot, n: u64) -> anyhow::Result<Cost> {
        let after = self.snapshot().await?;
        let n = n.max(1) as f64;
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n;
        Ok(Cost {
            wal_bytes: (after.wal - before.wal) as f64 / n,
            statements: (after.statements - before.statements) as f64 / n,
            hub_us: per(after.hub_cpu.saturating_sub(before.hub_cpu)),
            db_us: match (before.db_cpu, after.db_cpu) {
                (Some(b), Some(a)) => Some(per(a.saturating_sub(b))),
                _ => None,
            },
        })
    }

    /// Prints the statements that took the most database time since [`Meter::start`].
    pub async fn top_statements(&self) -> anyhow::Result<()> {
        if !self.pg_stat_statements {
            return Ok(());
        }
        let rows: Vec<(String, i64, f64, f64)> = sqlx::query_as(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time, mean_exec_time
             FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
             ORDER BY total_exec_time DESC LIMIT 4",
        )
        .fetch_all(&self.db)
        .await?;
        for (query, calls, total, mean) in rows {
            let query: String = query.chars().take(90).collect();
            println!("    {total:>8.0} ms {calls:>7} × {mean:>6.3} ms  {query}");
        }
        Ok(())
    }
}
