//! The embedded default: SQLite under the data dir, for one process. Calls run on the blocking
//! pool, one at a time on one connection.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use embedd_api::BulkJob;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{
    batch_record, done_chunk, file_row, job_record, millis, now, BatchRow, ChunkClaim, ChunkOutput,
    Commit, DoneChunk, FileRow, JobRecord, NewJob, StoreError, StoredRow, BATCH_COLUMNS,
    FILE_COLUMNS, JOB_COLUMNS,
};
use crate::csv_input::{ChunkPlan, CsvSummary};

/// Versioned migrations: `PRAGMA user_version` says how many have run. The first is the schema
/// of versions before chunked results (whose databases say 0 but have it, hence IF NOT EXISTS).
const MIGRATIONS: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        model_name TEXT NOT NULL,
        status TEXT NOT NULL,
        file_name TEXT NOT NULL,
        user_email TEXT,
        created_at TEXT NOT NULL,
        created_unix INTEGER NOT NULL,
        completed_at TEXT,
        completed_unix INTEGER,
        used_token_count INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        total_rows INTEGER NOT NULL,
        processed_rows INTEGER NOT NULL DEFAULT 0,
        truncated_rows INTEGER NOT NULL DEFAULT 0,
        result_bytes INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_unix);",
    "ALTER TABLE jobs ADD COLUMN text_column INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN chunk_count INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'csv';
    ALTER TABLE jobs ADD COLUMN failed_rows INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE chunks (
        job_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        first_row INTEGER NOT NULL,
        row_count INTEGER NOT NULL,
        byte_start INTEGER NOT NULL,
        byte_end INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        lease_owner TEXT,
        lease_until INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        result_bytes INTEGER NOT NULL DEFAULT 0,
        error_bytes INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, idx)
    );
    CREATE INDEX chunks_by_state ON chunks (state, job_id);
    CREATE TABLE key_turns (user_id TEXT PRIMARY KEY, served INTEGER NOT NULL);
    CREATE TABLE batches (
        job_id TEXT PRIMARY KEY,
        input_file_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        metadata TEXT,
        errors TEXT,
        cancelled_unix INTEGER
    );
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_unix INTEGER NOT NULL
    );",
];

impl StoredRow for Row<'_> {
    type Error = rusqlite::Error;
    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }
    fn opt_int(&self, i: usize) -> rusqlite::Result<Option<i64>> {
        self.get(i)
    }
    fn text(&self, i: usize) -> rusqlite::Result<String> {
        self.get(i)
    }
    fn opt_text(&self, i: usize) -> rusqlite::Result<Option<String>> {
        self.get(i)
    }
}

fn record(row: &Row) -> rusqlite::Result<JobRecord> {
    job_record(row)
}

/// Inserts a job (waiting, or failed with `error`) and its chunks.
fn insert_job(db: &Connection, new: &NewJob, error: Option<&str>) -> rusqlite::Result<()> {
    let (created_at, created_unix) = now();
    let (status, completed_at, completed_unix) = match error {
        Some(_) => ("failed", Some(created_at.clone()), Some(created_unix)),
        None => ("waiting", None, None),
    };
    db.execute(
        "INSERT INTO jobs (id, user_id, model_name, status, file_name, user_email, \
         created_at, created_unix, total_rows, text_column, chunk_count, kind, error, \
         completed_at, completed_unix) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            new.id,
            new.user_id,
            new.model_name,
            status,
            new.file_name,
            new.user_email,
            created_at,
            created_unix,
            new.rows as i64,
            new.text_column as i64,
            new.chunks.len() as i64,
            new.kind.as_str(),
            error,
            completed_at,
            completed_unix
        ],
    )?;
    insert_chunks(db, &new.id, &new.chunks)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, millis)
}

fn get_job(db: &Connection, id: &str) -> rusqlite::Result<Option<JobRecord>> {
    db.query_row(
        &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
        [id],
        record,
    )
    .optional()
}

fn insert_chunks(db: &Connection, id: &str, chunks: &[ChunkPlan]) -> rusqlite::Result<()> {
    let mut insert = db.prepare_cached(
        "INSERT INTO chunks (job_id, idx, first_row, row_count, byte_start, byte_end) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (index, chunk) in chunks.iter().enumerate() {
        insert.execute(params![
            id,
            index as i64,
            chunk.first_row as i64,
            chunk.rows as i64,
            chunk.byte_start as i64,
            chunk.byte_end as i64
        ])?;
    }
    Ok(())
}

pub struct SqliteStore {
    db: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (or creates, or migrates) `root/jobs.sqlite3`. This process owns the file, so any
    /// lease in it is left over from a process that died: those chunks are pending again.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root)?;
        let mut db = Connection::open(root.join("jobs.sqlite3"))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(Duration::from_secs(5))?;
        let version: usize = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = db.transaction()?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        db.execute(
            "UPDATE chunks SET state = 'pending', lease_owner = NULL WHERE state = 'leased'",
            [],
        )?;
        Ok(Self {
            db: Arc::new(Mutex::new(db)),
        })
    }

    /// Runs `f` on the connection off the async runtime.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock leaves SQLite consistent; keep using it.
            let mut db = db.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut db)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
        .map_err(StoreError::from)
    }

    pub async fn create(&self, new: NewJob) -> Result<BulkJob, StoreError> {
        let record = self
            .run(move |db| {
                let tx = db.transaction()?;
                insert_job(&tx, &new, None)?;
                let record = get_job(&tx, &new.id)?;
                tx.commit()?;
                record.ok_or(rusqlite::Error::QueryReturnedNoRows)
            })
            .await?;
        Ok(record.job)
    }

    pub async fn create_batch(&self, new: NewJob, batch: BatchRow) -> Result<(), StoreError> {
        self.run(move |db| {
            let tx = db.transaction()?;
            insert_job(
                &tx,
                &new,
                batch
                    .errors
                    .as_ref()
                    .map(|_| "the input file failed validation"),
            )?;
            tx.execute(
                "INSERT INTO batches (job_id, input_file_id, endpoint, completion_window, \
                 metadata, errors) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    new.id,
                    batch.input_file_id,
                    batch.endpoint,
                    batch.completion_window,
                    batch.metadata,
                    batch.errors
                ],
            )?;
            tx.commit()
        })
        .await
    }

    pub async fn get_batch(&self, id: &str) -> Result<Option<(JobRecord, BatchRow)>, StoreError> {
        let id = id.to_string();
        self.run(move |db| {
            db.query_row(
                &format!(
                    "SELECT {BATCH_COLUMNS} FROM jobs j JOIN batches b ON b.job_id = j.id \
                     WHERE j.id = ?1"
                ),
                [id],
                |r| batch_record(r),
            )
            .optional()
        })
        .await
    }

    pub async fn list_batches(
        &self,
        user_id: &str,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<(JobRecord, BatchRow)>, StoreError> {
        let (user_id, after) = (user_id.to_string(), after.map(str::to_string));
        self.run(move |db| {
            let mut stmt = db.prepare(&format!(
                "SELECT {BATCH_COLUMNS} FROM jobs j JOIN batches b ON b.job_id = j.id \
                 WHERE j.user_id = ?1 \
                 AND (?2 IS NULL OR j.rowid < (SELECT rowid FROM jobs WHERE id = ?2)) \
                 ORDER BY j.rowid DESC LIMIT ?3"
            ))?;
            let rows =
                stmt.query_map(params![user_id, after, limit as i64], |r| batch_record(r))?;
            rows.collect()
        })
        .await
    }

    pub async fn cancel(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        let (at, unix) = now();
        self.run(move |db| {
            let tx = db.transaction()?;
            let changed = tx.execute(
                "UPDATE jobs SET status = 'cancelled', completed_at = ?2, completed_unix = ?3 \
                 WHERE id = ?1 AND status IN ('waiting', 'in-progress')",
                params![id, at, unix],
            )?;
            if changed == 1 {
                tx.execute(
                    "UPDATE batches SET cancelled_unix = ?2 WHERE job_id = ?1",
                    params![id, unix],
                )?;
            }
            tx.commit()?;
            Ok(changed == 1)
        })
        .await
    }

    pub async fn done_chunks(&self, id: &str) -> Result<Vec<DoneChunk>, StoreError> {
        let id = id.to_string();
        self.run(move |db| {
            let mut stmt = db.prepare_cached(
                "SELECT idx, result_bytes, error_bytes FROM chunks \
                 WHERE job_id = ?1 AND state = 'done' ORDER BY idx",
            )?;
            let rows = stmt.query_map([id], |r| done_chunk(r))?;
            rows.collect()
        })
        .await
    }

    pub async fn create_file(&self, file: FileRow) -> Result<(), StoreError> {
        self.run(move |db| {
            db.execute(
                "INSERT INTO files (id, user_id, purpose, filename, bytes, created_unix) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    file.id,
                    file.user_id,
                    file.purpose,
                    file.filename,
                    file.bytes as i64,
                    file.created_unix
                ],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRow>, StoreError> {
        let id = id.to_string();
        self.run(move |db| {
            db.query_row(
                &format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1"),
                [id],
                |r| file_row(r),
            )
            .optional()
        })
        .await
    }

    pub async fn list_files(&self, user_id: &str, limit: u64) -> Result<Vec<FileRow>, StoreError> {
        let user_id = user_id.to_string();
        self.run(move |db| {
            let mut stmt = db.prepare(&format!(
                "SELECT {FILE_COLUMNS} FROM files WHERE user_id = ?1 \
                 ORDER BY created_unix DESC, rowid DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![user_id, limit as i64], |r| file_row(r))?;
            rows.collect()
        })
        .await
    }

    pub async fn delete_file(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.run(move |db| {
            db.execute("DELETE FROM files WHERE id = ?1", [id])?;
            Ok(())
        })
        .await
    }

    pub async fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let id = id.to_string();
        self.run(move |db| get_job(db, &id)).await
    }

    pub async fn unfinished_of(&self, user_id: &str) -> Result<u64, StoreError> {
        let user_id = user_id.to_string();
        self.run(move |db| {
            db.query_row(
                "SELECT COUNT(*) FROM jobs WHERE user_id = ?1 \
                 AND status IN ('in-progress', 'waiting')",
                [user_id],
                |row| row.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as u64)
    }

    pub async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        models: &[String],
    ) -> Result<Option<ChunkClaim>, StoreError> {
        let owner = owner.to_string();
        let models = serde_json::to_string(models).unwrap_or_else(|_| "[]".into());
        self.run(move |db| {
            let tx = db.transaction()?;
            let now = now_ms();
            let next = tx
                .query_row(
                    "SELECT c.job_id, c.idx, c.first_row, c.row_count, c.byte_start, c.byte_end, \
                     c.attempts, j.text_column \
                     FROM chunks c JOIN jobs j ON j.id = c.job_id \
                     LEFT JOIN key_turns k ON k.user_id = j.user_id \
                     WHERE j.status IN ('waiting', 'in-progress') \
                     AND j.model_name IN (SELECT value FROM json_each(?2)) \
                     AND (c.state = 'pending' OR (c.state = 'leased' AND c.lease_until < ?1)) \
                     ORDER BY COALESCE(k.served, 0), j.status = 'waiting', j.created_unix, \
                     j.rowid, c.idx LIMIT 1",
                    params![now, models],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)? as u64,
                            ChunkPlan {
                                first_row: r.get::<_, i64>(2)? as u64,
                                rows: r.get::<_, i64>(3)? as u64,
                                byte_start: r.get::<_, i64>(4)? as u64,
                                byte_end: r.get::<_, i64>(5)? as u64,
                            },
                            r.get::<_, i64>(6)? as u64 + 1,
                            r.get::<_, i64>(7)? as usize,
                        ))
                    },
                )
                .optional()?;
            let Some((job_id, index, plan, attempt, text_column)) = next else {
                return Ok(None);
            };
            tx.execute(
                "UPDATE chunks SET state = 'leased', lease_owner = ?3, lease_until = ?4, \
                 attempts = attempts + 1 WHERE job_id = ?1 AND idx = ?2",
                params![job_id, index as i64, owner, now + millis(lease)],
            )?;
            tx.execute(
                "UPDATE jobs SET status = 'in-progress' WHERE id = ?1 AND status = 'waiting'",
                [&job_id],
            )?;
            tx.execute(
                "INSERT INTO key_turns (user_id, served) \
                 SELECT user_id, (SELECT COALESCE(MAX(served), 0) + 1 FROM key_turns) \
                 FROM jobs WHERE id = ?1 \
                 ON CONFLICT (user_id) DO UPDATE SET served = excluded.served",
                [&job_id],
            )?;
            let record = get_job(&tx, &job_id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
            tx.commit()?;
            Ok(Some(ChunkClaim {
                kind: record.kind,
                job: record.job,
                text_column,
                index,
                plan,
                attempt,
            }))
        })
        .await
    }

    pub async fn renew(
        &self,
        job_id: &str,
        index: u64,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let (job_id, owner) = (job_id.to_string(), owner.to_string());
        self.run(move |db| {
            let changed = db.execute(
                "UPDATE chunks SET lease_until = ?4 WHERE job_id = ?1 AND idx = ?2 \
                 AND state = 'leased' AND lease_owner = ?3 AND EXISTS \
                 (SELECT 1 FROM jobs WHERE id = ?1 AND status = 'in-progress')",
                params![job_id, index as i64, owner, now_ms() + millis(lease)],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    pub async fn commit(
        &self,
        claim: &ChunkClaim,
        owner: &str,
        output: ChunkOutput,
    ) -> Result<Commit, StoreError> {
        let (job_id, index, rows) = (claim.job.id.clone(), claim.index, claim.plan.rows);
        let owner = owner.to_string();
        let (at, unix) = now();
        self.run(move |db| {
            let tx = db.transaction()?;
            let changed = tx.execute(
                "UPDATE chunks SET state = 'done', lease_owner = NULL, result_bytes = ?4, \
                 error_bytes = ?5 \
                 WHERE job_id = ?1 AND idx = ?2 AND state = 'leased' AND lease_owner = ?3 \
                 AND EXISTS (SELECT 1 FROM jobs WHERE id = ?1 AND status = 'in-progress')",
                params![
                    job_id,
                    index as i64,
                    owner,
                    output.result_bytes as i64,
                    output.error_bytes as i64
                ],
            )?;
            if changed == 0 {
                return Ok(Commit::LeaseLost);
            }
            let status: String = tx.query_row(
                "UPDATE jobs SET processed_rows = processed_rows + ?2, \
                 used_token_count = used_token_count + ?3, truncated_rows = truncated_rows + ?4, \
                 failed_rows = failed_rows + ?7, \
                 status = CASE WHEN status = 'in-progress' AND processed_rows + ?2 >= total_rows \
                     THEN 'completed' ELSE status END, \
                 completed_at = CASE WHEN status = 'in-progress' AND processed_rows + ?2 >= total_rows \
                     THEN ?5 ELSE completed_at END, \
                 completed_unix = CASE WHEN status = 'in-progress' AND processed_rows + ?2 >= total_rows \
                     THEN ?6 ELSE completed_unix END \
                 WHERE id = ?1 RETURNING status",
                params![
                    job_id,
                    rows as i64,
                    output.tokens as i64,
                    output.truncated as i64,
                    at,
                    unix,
                    output.failed as i64
                ],
                |r| r.get(0),
            )?;
            tx.commit()?;
            Ok(Commit::Counted {
                job_completed: status == "completed",
            })
        })
        .await
    }

    pub async fn fail(&self, id: &str, error: &str) -> Result<(), StoreError> {
        let (id, error) = (id.to_string(), error.to_string());
        let (at, unix) = now();
        self.run(move |db| {
            db.execute(
                "UPDATE jobs SET status = 'failed', error = ?2, completed_at = ?3, \
                 completed_unix = ?4 WHERE id = ?1 AND status IN ('waiting', 'in-progress')",
                params![id, error, at, unix],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn release(&self, owner: &str) -> Result<(), StoreError> {
        let owner = owner.to_string();
        self.run(move |db| {
            db.execute(
                "UPDATE chunks SET state = 'pending', lease_owner = NULL \
                 WHERE state = 'leased' AND lease_owner = ?1",
                [owner],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn unplanned(&self) -> Result<Vec<String>, StoreError> {
        self.run(|db| {
            let mut stmt = db.prepare(
                "SELECT id FROM jobs WHERE chunk_count = 0 \
                 AND status IN ('waiting', 'in-progress') ORDER BY rowid",
            )?;
            let ids = stmt.query_map([], |r| r.get(0))?;
            ids.collect()
        })
        .await
    }

    pub async fn plan(&self, id: &str, summary: &CsvSummary) -> Result<(), StoreError> {
        let (id, summary) = (id.to_string(), summary.clone());
        self.run(move |db| {
            let tx = db.transaction()?;
            tx.execute("DELETE FROM chunks WHERE job_id = ?1", [&id])?;
            insert_chunks(&tx, &id, &summary.chunks)?;
            tx.execute(
                "UPDATE jobs SET chunk_count = ?2, text_column = ?3, total_rows = ?4, \
                 processed_rows = 0, used_token_count = 0, truncated_rows = 0 WHERE id = ?1",
                params![
                    id,
                    summary.chunks.len() as i64,
                    summary.text_column as i64,
                    summary.rows as i64
                ],
            )?;
            tx.commit()
        })
        .await
    }

    pub async fn finished_before(&self, cutoff_unix: i64) -> Result<Vec<String>, StoreError> {
        self.run(move |db| {
            let mut stmt = db.prepare(
                "SELECT id FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') \
                 AND completed_unix < ?1",
            )?;
            let ids = stmt.query_map([cutoff_unix], |r| r.get(0))?;
            ids.collect()
        })
        .await
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.run(move |db| {
            let tx = db.transaction()?;
            tx.execute("DELETE FROM chunks WHERE job_id = ?1", [&id])?;
            tx.execute("DELETE FROM batches WHERE job_id = ?1", [&id])?;
            tx.execute("DELETE FROM jobs WHERE id = ?1", [&id])?;
            tx.commit()
        })
        .await
    }

    pub async fn count_by_status(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.run(|db| {
            let mut stmt = db.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
            rows.collect()
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(|db| db.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database written by the version before chunked results (its schema, `user_version`
    /// 0) opens migrated: its finished job keeps its one-file result, its unfinished one is
    /// listed for planning.
    #[test]
    fn a_database_from_before_chunked_results_is_migrated() {
        use crate::store::JobKind;
        let root = std::env::temp_dir().join(format!("embedd-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let old = Connection::open(root.join("jobs.sqlite3")).unwrap();
        old.execute_batch(MIGRATIONS[0]).unwrap();
        for (id, status) in [("done1", "completed"), ("half1", "in-progress")] {
            old.execute(
                "INSERT INTO jobs (id, user_id, model_name, status, file_name, created_at, \
                 created_unix, total_rows, processed_rows) \
                 VALUES (?1, 'u', 'm', ?2, 'f.csv', 'then', 1, 10, 4)",
                params![id, status],
            )
            .unwrap();
        }
        drop(old);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = SqliteStore::open(&root).unwrap();
        let done = rt.block_on(store.get("done1")).unwrap().unwrap();
        assert_eq!((done.chunks, done.kind), (0, JobKind::Csv));
        assert_eq!(rt.block_on(store.unplanned()).unwrap(), ["half1"]);
        let version: i64 = store
            .db
            .lock()
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        drop(store);
        // Opening again runs nothing twice.
        SqliteStore::open(&root).unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }
}
