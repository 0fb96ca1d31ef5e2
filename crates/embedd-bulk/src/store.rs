//! Job state in an embedded SQLite database under the data dir; input and result files beside it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use embedd_api::{BulkJob, BulkJobStatus};
use rusqlite::{params, Connection, OptionalExtension, Row};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("job store files: {0}")]
    Io(#[from] std::io::Error),
}

/// A job as stored, with the byte length of its committed result.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub job: BulkJob,
    pub result_bytes: u64,
}

pub struct NewJob<'a> {
    pub user_id: &'a str,
    pub model_name: &'a str,
    pub file_name: &'a str,
    pub user_email: Option<&'a str>,
    pub total_rows: u64,
    /// The uploaded file's bytes, stored before the job exists.
    pub upload: &'a [u8],
}

pub struct JobStore {
    db: Mutex<Connection>,
    root: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
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
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_unix);
";

const COLUMNS: &str = "id, user_id, model_name, status, file_name, created_at, completed_at, \
     user_email, used_token_count, error, total_rows, processed_rows, truncated_rows, result_bytes";

fn now() -> (String, i64) {
    let t = OffsetDateTime::now_utc();
    (t.format(&Rfc3339).unwrap_or_default(), t.unix_timestamp())
}

fn record(row: &Row) -> rusqlite::Result<JobRecord> {
    let status: String = row.get(3)?;
    Ok(JobRecord {
        job: BulkJob {
            id: row.get(0)?,
            user_id: row.get(1)?,
            model_name: row.get(2)?,
            status: BulkJobStatus::parse(&status).unwrap_or(BulkJobStatus::Failed),
            file_name: row.get(4)?,
            created_at: row.get(5)?,
            completed_at: row.get(6)?,
            user_email: row.get(7)?,
            used_token_count: row.get::<_, i64>(8)? as u64,
            error: row.get(9)?,
            total_rows: row.get::<_, i64>(10)? as u64,
            processed_rows: row.get::<_, i64>(11)? as u64,
            truncated_rows: row.get::<_, i64>(12)? as u64,
        },
        result_bytes: row.get::<_, i64>(13)? as u64,
    })
}

impl JobStore {
    /// Opens (or creates) the store under `data_dir/bulk`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let root = data_dir.join("bulk");
        std::fs::create_dir_all(root.join("jobs"))?;
        let db = Connection::open(root.join("jobs.sqlite3"))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(SCHEMA)?;
        Ok(Self {
            db: Mutex::new(db),
            root,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.root.join("jobs").join(id)
    }

    pub fn input_path(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("input.csv")
    }

    pub fn result_path(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("result.csv")
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent; keep using it.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores the upload durably, then the job: once this returns, the job will run.
    pub fn create(&self, new: NewJob) -> Result<BulkJob, StoreError> {
        let mut raw = [0u8; 12];
        getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
        let id = hex::encode(raw);
        let dir = self.job_dir(&id);
        std::fs::create_dir_all(&dir)?;
        let partial = dir.join("input.csv.partial");
        let mut file = File::create(&partial)?;
        file.write_all(new.upload)?;
        file.sync_all()?;
        std::fs::rename(&partial, self.input_path(&id))?;
        File::open(&dir)?.sync_all()?;

        let (created_at, created_unix) = now();
        self.db().execute(
            "INSERT INTO jobs (id, user_id, model_name, status, file_name, user_email, created_at, \
             created_unix, total_rows) VALUES (?1, ?2, ?3, 'waiting', ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                new.user_id,
                new.model_name,
                new.file_name,
                new.user_email,
                created_at,
                created_unix,
                new.total_rows as i64
            ],
        )?;
        Ok(self
            .get(&id)?
            .map(|r| r.job)
            .ok_or(rusqlite::Error::QueryReturnedNoRows)?)
    }

    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        Ok(self
            .db()
            .query_row(
                &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                record,
            )
            .optional()?)
    }

    /// The jobs not finished: interrupted ones first, then oldest first.
    pub fn unfinished(&self) -> Result<Vec<JobRecord>, StoreError> {
        let db = self.db();
        let mut statement = db.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE status IN ('in-progress', 'waiting') \
             ORDER BY status = 'waiting', rowid"
        ))?;
        let rows = statement.query_map([], record)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many unfinished jobs `user_id` has.
    pub fn unfinished_of(&self, user_id: &str) -> Result<u64, StoreError> {
        let count: i64 = self.db().query_row(
            "SELECT COUNT(*) FROM jobs WHERE user_id = ?1 AND status IN ('in-progress', 'waiting')",
            [user_id],
            |row| row.get(0),
        )?;
        Ok(count as u64)
    }

    pub fn mark_in_progress(&self, id: &str) -> Result<(), StoreError> {
        self.db().execute(
            "UPDATE jobs SET status = 'in-progress' WHERE id = ?1 AND status = 'waiting'",
            [id],
        )?;
        Ok(())
    }

    /// Records a chunk whose rows are already synced to the result file.
    pub fn commit_chunk(
        &self,
        id: &str,
        processed_rows: u64,
        result_bytes: u64,
        tokens: u64,
        truncated: u64,
    ) -> Result<(), StoreError> {
        self.db().execute(
            "UPDATE jobs SET processed_rows = ?2, result_bytes = ?3, \
             used_token_count = used_token_count + ?4, truncated_rows = truncated_rows + ?5 \
             WHERE id = ?1",
            params![
                id,
                processed_rows as i64,
                result_bytes as i64,
                tokens as i64,
                truncated as i64
            ],
        )?;
        Ok(())
    }

    pub fn finish(&self, id: &str, error: Option<&str>) -> Result<(), StoreError> {
        let (at, unix) = now();
        let status = if error.is_some() {
            "failed"
        } else {
            "completed"
        };
        self.db().execute(
            "UPDATE jobs SET status = ?2, error = ?3, completed_at = ?4, completed_unix = ?5 \
             WHERE id = ?1",
            params![id, status, error, at, unix],
        )?;
        Ok(())
    }

    /// Deletes finished jobs (and their files) completed before `cutoff_unix`; returns how many.
    pub fn delete_finished_before(&self, cutoff_unix: i64) -> Result<usize, StoreError> {
        let ids: Vec<String> = {
            let db = self.db();
            let mut stmt = db.prepare(
                "SELECT id FROM jobs WHERE status IN ('completed', 'failed') AND completed_unix < ?1",
            )?;
            let rows = stmt.query_map([cutoff_unix], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for id in &ids {
            match std::fs::remove_dir_all(self.job_dir(id)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            self.db().execute("DELETE FROM jobs WHERE id = ?1", [id])?;
        }
        Ok(ids.len())
    }

    /// Jobs by status, for metrics.
    pub fn count_by_status(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (JobStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "embedd-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        (JobStore::open(&dir).unwrap(), dir)
    }

    fn new_job(upload: &[u8]) -> NewJob<'_> {
        NewJob {
            user_id: "anonymous",
            model_name: "m",
            file_name: "in.csv",
            user_email: Some("a@b.co"),
            total_rows: 2,
            upload,
        }
    }

    #[test]
    fn a_job_lives_through_its_states_and_a_reopen() {
        let (s, dir) = store();
        let job = s.create(new_job(b"a\nb\n")).unwrap();
        assert_eq!(job.status, BulkJobStatus::Waiting);
        assert_eq!(job.id.len(), 24);
        assert_eq!(std::fs::read(s.input_path(&job.id)).unwrap(), b"a\nb\n");
        s.mark_in_progress(&job.id).unwrap();
        let claimed = s.get(&job.id).unwrap().unwrap();
        assert_eq!(claimed.job.status, BulkJobStatus::InProgress);
        s.commit_chunk(&job.id, 1, 10, 5, 0).unwrap();
        drop(s);
        let s = JobStore::open(&dir).unwrap();
        let again = s.unfinished().unwrap().remove(0);
        assert_eq!(
            (
                again.job.processed_rows,
                again.result_bytes,
                again.job.used_token_count
            ),
            (1, 10, 5)
        );
        s.finish(&job.id, None).unwrap();
        let done = s.get(&job.id).unwrap().unwrap().job;
        assert_eq!(done.status, BulkJobStatus::Completed);
        assert!(done.completed_at.is_some());
        assert!(s.unfinished().unwrap().is_empty());
        assert_eq!(s.delete_finished_before(i64::MAX).unwrap(), 1);
        assert!(s.get(&job.id).unwrap().is_none());
        assert!(!s.input_path(&job.id).exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn interrupted_jobs_come_before_waiting_ones() {
        let (s, dir) = store();
        let first = s.create(new_job(b"a\n")).unwrap();
        let second = s.create(new_job(b"b\n")).unwrap();
        s.mark_in_progress(&second.id).unwrap();
        let order: Vec<String> = s
            .unfinished()
            .unwrap()
            .into_iter()
            .map(|r| r.job.id)
            .collect();
        assert_eq!(order, [second.id.clone(), first.id.clone()]);
        assert_eq!(s.unfinished_of("anonymous").unwrap(), 2);
        s.finish(&second.id, Some("boom")).unwrap();
        let failed = s.get(&second.id).unwrap().unwrap().job;
        assert_eq!(failed.status, BulkJobStatus::Failed);
        assert_eq!(failed.error.as_deref(), Some("boom"));
        assert_eq!(s.unfinished().unwrap()[0].job.id, first.id);
        assert_eq!(s.unfinished_of("anonymous").unwrap(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
