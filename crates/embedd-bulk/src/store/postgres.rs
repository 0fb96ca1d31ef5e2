//! PostgreSQL, shared by every replica. Claims take the next chunk with `FOR UPDATE SKIP
//! LOCKED`, so replicas never wait on each other's claims; lease times come from the database's
//! clock, so replicas' clocks need not agree.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use embedd_api::BulkJob;
use tokio_postgres::{NoTls, Row};

use super::{
    batch_record, done_chunk, file_row, job_record, millis, now, BatchRow, ChunkClaim, ChunkOutput,
    Commit, DoneChunk, FileRow, JobRecord, NewJob, StoreError, StoredRow, BATCH_COLUMNS,
    FILE_COLUMNS, JOB_COLUMNS,
};
use crate::csv_input::{ChunkPlan, CsvSummary};

/// Versioned migrations, recorded in `embedd_schema`; replicas starting together take turns
/// under an advisory lock.
const MIGRATIONS: [&str; 1] = ["CREATE TABLE bulk_jobs (
        id TEXT PRIMARY KEY,
        seq BIGSERIAL,
        user_id TEXT NOT NULL,
        model_name TEXT NOT NULL,
        status TEXT NOT NULL,
        file_name TEXT NOT NULL,
        user_email TEXT,
        created_at TEXT NOT NULL,
        created_unix BIGINT NOT NULL,
        completed_at TEXT,
        completed_unix BIGINT,
        used_token_count BIGINT NOT NULL DEFAULT 0,
        error TEXT,
        total_rows BIGINT NOT NULL,
        processed_rows BIGINT NOT NULL DEFAULT 0,
        truncated_rows BIGINT NOT NULL DEFAULT 0,
        text_column BIGINT NOT NULL DEFAULT 0,
        chunk_count BIGINT NOT NULL DEFAULT 0,
        kind TEXT NOT NULL DEFAULT 'csv',
        failed_rows BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX bulk_jobs_by_status ON bulk_jobs (status, created_unix);
    CREATE TABLE bulk_chunks (
        job_id TEXT NOT NULL REFERENCES bulk_jobs (id) ON DELETE CASCADE,
        idx BIGINT NOT NULL,
        first_row BIGINT NOT NULL,
        row_count BIGINT NOT NULL,
        byte_start BIGINT NOT NULL,
        byte_end BIGINT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        lease_owner TEXT,
        lease_until BIGINT NOT NULL DEFAULT 0,
        attempts BIGINT NOT NULL DEFAULT 0,
        result_bytes BIGINT NOT NULL DEFAULT 0,
        error_bytes BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, idx)
    );
    CREATE INDEX bulk_chunks_by_state ON bulk_chunks (state, job_id);
    CREATE TABLE bulk_key_turns (user_id TEXT PRIMARY KEY, served BIGINT NOT NULL);
    CREATE SEQUENCE bulk_turns;
    CREATE TABLE bulk_batches (
        job_id TEXT PRIMARY KEY REFERENCES bulk_jobs (id) ON DELETE CASCADE,
        input_file_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        metadata TEXT,
        errors TEXT,
        cancelled_unix BIGINT
    );
    CREATE TABLE bulk_files (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        created_unix BIGINT NOT NULL
    );"];

/// An arbitrary constant naming embedd's migration lock.
const MIGRATION_LOCK: i64 = 0x656d_6265_6464;

/// The database's clock, in milliseconds.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

impl StoredRow for Row {
    type Error = tokio_postgres::Error;
    fn int(&self, i: usize) -> Result<i64, Self::Error> {
        self.try_get(i)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, Self::Error> {
        self.try_get(i)
    }
    fn text(&self, i: usize) -> Result<String, Self::Error> {
        self.try_get(i)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, Self::Error> {
        self.try_get(i)
    }
}

fn record(row: &Row) -> Result<JobRecord, tokio_postgres::Error> {
    job_record(row)
}

/// Inserts a job (waiting, or failed with `error`) and its chunks.
async fn insert_job(
    tx: &deadpool_postgres::Transaction<'_>,
    new: &NewJob,
    error: Option<&str>,
) -> Result<(), StoreError> {
    let (created_at, created_unix) = now();
    let (status, completed_at, completed_unix) = match error {
        Some(_) => ("failed", Some(created_at.clone()), Some(created_unix)),
        None => ("waiting", None, None),
    };
    tx.execute(
        "INSERT INTO bulk_jobs (id, user_id, model_name, status, file_name, user_email, \
         created_at, created_unix, total_rows, text_column, chunk_count, kind, error, \
         completed_at, completed_unix) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        &[
            &new.id,
            &new.user_id,
            &new.model_name,
            &status,
            &new.file_name,
            &new.user_email,
            &created_at,
            &created_unix,
            &(new.rows as i64),
            &(new.text_column as i64),
            &(new.chunks.len() as i64),
            &new.kind.as_str(),
            &error,
            &completed_at,
            &completed_unix,
        ],
    )
    .await?;
    insert_chunks(tx, &new.id, &new.chunks).await
}

fn pool_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Pool(e.to_string())
}

async fn insert_chunks(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &str,
    chunks: &[ChunkPlan],
) -> Result<(), StoreError> {
    let insert = tx
        .prepare_cached(
            "INSERT INTO bulk_chunks (job_id, idx, first_row, row_count, byte_start, byte_end) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
    for (index, chunk) in chunks.iter().enumerate() {
        tx.execute(
            &insert,
            &[
                &id,
                &(index as i64),
                &(chunk.first_row as i64),
                &(chunk.rows as i64),
                &(chunk.byte_start as i64),
                &(chunk.byte_end as i64),
            ],
        )
        .await?;
    }
    Ok(())
}

pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    pub async fn connect(address: &str) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(address)
            .map_err(|_| StoreError::Address(address.to_string()))?;
        // A database that does not answer is an error in seconds, not a hung start or request.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(pool_error)?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS embedd_schema (version BIGINT NOT NULL)")
            .await?;
        let version: i64 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM embedd_schema", &[])
            .await?
            .try_get(0)?;
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(migration).await?;
            tx.execute(
                "INSERT INTO embedd_schema (version) VALUES ($1)",
                &[&(i as i64 + 1)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn create(&self, new: NewJob) -> Result<BulkJob, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        insert_job(&tx, &new, None).await?;
        let row = tx
            .query_one(
                &format!("SELECT {JOB_COLUMNS} FROM bulk_jobs WHERE id = $1"),
                &[&new.id],
            )
            .await?;
        tx.commit().await?;
        Ok(record(&row)?.job)
    }

    pub async fn create_batch(&self, new: NewJob, batch: BatchRow) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let error = batch
            .errors
            .as_ref()
            .map(|_| "the input file failed validation");
        insert_job(&tx, &new, error).await?;
        tx.execute(
            "INSERT INTO bulk_batches (job_id, input_file_id, endpoint, completion_window, \
             metadata, errors) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &new.id,
                &batch.input_file_id,
                &batch.endpoint,
                &batch.completion_window,
                &batch.metadata,
                &batch.errors,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_batch(&self, id: &str) -> Result<Option<(JobRecord, BatchRow)>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {BATCH_COLUMNS} FROM bulk_jobs j \
                     JOIN bulk_batches b ON b.job_id = j.id WHERE j.id = $1"
                ),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(batch_record).transpose()?)
    }

    pub async fn list_batches(
        &self,
        user_id: &str,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<(JobRecord, BatchRow)>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {BATCH_COLUMNS} FROM bulk_jobs j \
                     JOIN bulk_batches b ON b.job_id = j.id WHERE j.user_id = $1 \
                     AND ($2::text IS NULL OR j.seq < (SELECT seq FROM bulk_jobs WHERE id = $2)) \
                     ORDER BY j.seq DESC LIMIT $3"
                ),
                &[&user_id, &after, &(limit as i64)],
            )
            .await?;
        Ok(rows.iter().map(batch_record).collect::<Result<_, _>>()?)
    }

    pub async fn cancel(&self, id: &str) -> Result<bool, StoreError> {
        let (at, unix) = now();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let changed = tx
            .execute(
                "UPDATE bulk_jobs SET status = 'cancelled', completed_at = $2, \
                 completed_unix = $3 WHERE id = $1 AND status IN ('waiting', 'in-progress')",
                &[&id, &at, &unix],
            )
            .await?;
        if changed == 1 {
            tx.execute(
                "UPDATE bulk_batches SET cancelled_unix = $2 WHERE job_id = $1",
                &[&id, &unix],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(changed == 1)
    }

    pub async fn done_chunks(&self, id: &str) -> Result<Vec<DoneChunk>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT idx, result_bytes, error_bytes FROM bulk_chunks \
                 WHERE job_id = $1 AND state = 'done' ORDER BY idx",
                &[&id],
            )
            .await?;
        Ok(rows.iter().map(done_chunk).collect::<Result<_, _>>()?)
    }

    pub async fn create_file(&self, file: FileRow) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO bulk_files (id, user_id, purpose, filename, bytes, created_unix) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &file.id,
                    &file.user_id,
                    &file.purpose,
                    &file.filename,
                    &(file.bytes as i64),
                    &file.created_unix,
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRow>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {FILE_COLUMNS} FROM bulk_files WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(file_row).transpose()?)
    }

    pub async fn list_files(&self, user_id: &str, limit: u64) -> Result<Vec<FileRow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM bulk_files WHERE user_id = $1 \
                     ORDER BY created_unix DESC, id DESC LIMIT $2"
                ),
                &[&user_id, &(limit as i64)],
            )
            .await?;
        Ok(rows.iter().map(file_row).collect::<Result<_, _>>()?)
    }

    pub async fn delete_file(&self, id: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("DELETE FROM bulk_files WHERE id = $1", &[&id])
            .await?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {JOB_COLUMNS} FROM bulk_jobs WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(record).transpose()?)
    }

    pub async fn unfinished_of(&self, user_id: &str) -> Result<u64, StoreError> {
        let n: i64 = self
            .client()
            .await?
            .query_one(
                "SELECT COUNT(*) FROM bulk_jobs WHERE user_id = $1 \
                 AND status IN ('in-progress', 'waiting')",
                &[&user_id],
            )
            .await?
            .try_get(0)?;
        Ok(n as u64)
    }

    pub async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        models: &[String],
    ) -> Result<Option<ChunkClaim>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let claimed = tx
            .query_opt(
                &format!(
                    "WITH next AS ( \
                       SELECT c.job_id, c.idx FROM bulk_chunks c \
                       JOIN bulk_jobs j ON j.id = c.job_id \
                       LEFT JOIN bulk_key_turns k ON k.user_id = j.user_id \
                       WHERE j.status IN ('waiting', 'in-progress') AND j.model_name = ANY($3) \
                       AND (c.state = 'pending' OR (c.state = 'leased' AND c.lease_until < {NOW_MS})) \
                       ORDER BY COALESCE(k.served, 0), j.status = 'waiting', j.seq, c.idx \
                       LIMIT 1 FOR UPDATE OF c SKIP LOCKED) \
                     UPDATE bulk_chunks c SET state = 'leased', lease_owner = $1, \
                       lease_until = {NOW_MS} + $2, attempts = c.attempts + 1 \
                     FROM next WHERE c.job_id = next.job_id AND c.idx = next.idx \
                     RETURNING c.job_id, c.idx, c.first_row, c.row_count, c.byte_start, \
                       c.byte_end, c.attempts"
                ),
                &[&owner, &millis(lease), &models],
            )
            .await?;
        let Some(row) = claimed else {
            return Ok(None);
        };
        let job_id: String = row.try_get(0)?;
        let index = row.try_get::<_, i64>(1)? as u64;
        let plan = ChunkPlan {
            first_row: row.try_get::<_, i64>(2)? as u64,
            rows: row.try_get::<_, i64>(3)? as u64,
            byte_start: row.try_get::<_, i64>(4)? as u64,
            byte_end: row.try_get::<_, i64>(5)? as u64,
        };
        let attempt = row.try_get::<_, i64>(6)? as u64;
        // Only a job's first claim writes its row, so a claim never waits on a commit of the
        // same job (which locks the chunk, then the job: the same order as here).
        tx.execute(
            "UPDATE bulk_jobs SET status = 'in-progress' WHERE id = $1 AND status = 'waiting'",
            &[&job_id],
        )
        .await?;
        tx.execute(
            "INSERT INTO bulk_key_turns (user_id, served) \
             SELECT user_id, nextval('bulk_turns') FROM bulk_jobs WHERE id = $1 \
             ON CONFLICT (user_id) DO UPDATE SET served = excluded.served",
            &[&job_id],
        )
        .await?;
        let job = tx
            .query_one(
                &format!("SELECT {JOB_COLUMNS}, text_column FROM bulk_jobs WHERE id = $1"),
                &[&job_id],
            )
            .await?;
        let text_column = job.try_get::<_, i64>(18)? as usize;
        let record = record(&job)?;
        tx.commit().await?;
        Ok(Some(ChunkClaim {
            job: record.job,
            kind: record.kind,
            text_column,
            index,
            plan,
            attempt,
        }))
    }

    pub async fn renew(
        &self,
        job_id: &str,
        index: u64,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let changed = self
            .client()
            .await?
            .execute(
                &format!(
                    "UPDATE bulk_chunks SET lease_until = {NOW_MS} + $4 \
                     WHERE job_id = $1 AND idx = $2 AND state = 'leased' AND lease_owner = $3 \
                     AND EXISTS (SELECT 1 FROM bulk_jobs WHERE id = $1 AND status = 'in-progress')"
                ),
                &[&job_id, &(index as i64), &owner, &millis(lease)],
            )
            .await?;
        Ok(changed == 1)
    }

    pub async fn commit(
        &self,
        claim: &ChunkClaim,
        owner: &str,
        output: ChunkOutput,
    ) -> Result<Commit, StoreError> {
        let (at, unix) = now();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let changed = tx
            .execute(
                "UPDATE bulk_chunks SET state = 'done', lease_owner = NULL, result_bytes = $4, \
                 error_bytes = $5 \
                 WHERE job_id = $1 AND idx = $2 AND state = 'leased' AND lease_owner = $3 \
                 AND EXISTS (SELECT 1 FROM bulk_jobs WHERE id = $1 AND status = 'in-progress')",
                &[
                    &claim.job.id,
                    &(claim.index as i64),
                    &owner,
                    &(output.result_bytes as i64),
                    &(output.error_bytes as i64),
                ],
            )
            .await?;
        if changed == 0 {
            return Ok(Commit::LeaseLost);
        }
        let status: String = tx
            .query_one(
                "UPDATE bulk_jobs SET processed_rows = processed_rows + $2, \
                 used_token_count = used_token_count + $3, truncated_rows = truncated_rows + $4, \
                 failed_rows = failed_rows + $7, \
                 status = CASE WHEN status = 'in-progress' AND processed_rows + $2 >= total_rows \
                     THEN 'completed' ELSE status END, \
                 completed_at = CASE WHEN status = 'in-progress' AND processed_rows + $2 >= total_rows \
                     THEN $5 ELSE completed_at END, \
                 completed_unix = CASE WHEN status = 'in-progress' AND processed_rows + $2 >= total_rows \
                     THEN $6 ELSE completed_unix END \
                 WHERE id = $1 RETURNING status",
                &[
                    &claim.job.id,
                    &(claim.plan.rows as i64),
                    &(output.tokens as i64),
                    &(output.truncated as i64),
                    &at,
                    &unix,
                    &(output.failed as i64),
                ],
            )
            .await?
            .try_get(0)?;
        tx.commit().await?;
        Ok(Commit::Counted {
            job_completed: status == "completed",
        })
    }

    pub async fn fail(&self, id: &str, error: &str) -> Result<(), StoreError> {
        let (at, unix) = now();
        self.client()
            .await?
            .execute(
                "UPDATE bulk_jobs SET status = 'failed', error = $2, completed_at = $3, \
                 completed_unix = $4 WHERE id = $1 AND status IN ('waiting', 'in-progress')",
                &[&id, &error, &at, &unix],
            )
            .await?;
        Ok(())
    }

    pub async fn release(&self, owner: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "UPDATE bulk_chunks SET state = 'pending', lease_owner = NULL \
                 WHERE state = 'leased' AND lease_owner = $1",
                &[&owner],
            )
            .await?;
        Ok(())
    }

    pub async fn unplanned(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id FROM bulk_jobs WHERE chunk_count = 0 \
                 AND status IN ('waiting', 'in-progress') ORDER BY seq",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    pub async fn plan(&self, id: &str, summary: &CsvSummary) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("DELETE FROM bulk_chunks WHERE job_id = $1", &[&id])
            .await?;
        insert_chunks(&tx, id, &summary.chunks).await?;
        tx.execute(
            "UPDATE bulk_jobs SET chunk_count = $2, text_column = $3, total_rows = $4, \
             processed_rows = 0, used_token_count = 0, truncated_rows = 0 WHERE id = $1",
            &[
                &id,
                &(summary.chunks.len() as i64),
                &(summary.text_column as i64),
                &(summary.rows as i64),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn finished_before(&self, cutoff_unix: i64) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id FROM bulk_jobs WHERE status IN ('completed', 'failed', 'cancelled') \
                 AND completed_unix < $1",
                &[&cutoff_unix],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("DELETE FROM bulk_jobs WHERE id = $1", &[&id])
            .await?;
        Ok(())
    }

    pub async fn count_by_status(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT status, COUNT(*) FROM bulk_jobs GROUP BY status",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
            .collect()
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.execute("SELECT 1", &[]).await?;
        Ok(())
    }
}
