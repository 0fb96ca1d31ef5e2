//! A job's files as objects: its upload, and one result object per chunk, in local files under
//! the data dir by default or in an S3 bucket (`--bulk-objects s3://BUCKET/PREFIX`) that every
//! replica shares. Object writes are atomic, so a chunk's result is there whole or not at all.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("bulk object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("bulk object store address '{0}': expected s3://BUCKET or s3://BUCKET/PREFIX")]
    Address(String),
    #[error("bulk object store files: {0}")]
    Io(#[from] std::io::Error),
}

impl ObjectsError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Store(object_store::Error::NotFound { .. }))
    }
}

pub type ObjectStream = BoxStream<'static, Result<Bytes, ObjectsError>>;

#[derive(Clone)]
pub struct JobObjects {
    store: Arc<dyn ObjectStore>,
    /// What `--bulk-objects` named, for logs and `/ready`.
    describe: String,
}

fn job_prefix(id: &str) -> ObjectPath {
    ObjectPath::from(format!("jobs/{id}"))
}

fn input_path(id: &str) -> ObjectPath {
    ObjectPath::from(format!("jobs/{id}/input.csv"))
}

fn chunk_path(id: &str, index: u64) -> ObjectPath {
    ObjectPath::from(format!("jobs/{id}/chunks/{index:08}"))
}

/// A batch chunk's error lines, beside its output lines.
fn errors_path(id: &str, index: u64) -> ObjectPath {
    ObjectPath::from(format!("jobs/{id}/errors/{index:08}"))
}

fn file_path(id: &str) -> ObjectPath {
    ObjectPath::from(format!("files/{id}"))
}

/// Which of a chunk's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPart {
    Results,
    Errors,
}

/// Where jobs from before chunked results kept their whole result.
fn legacy_result_path(id: &str) -> ObjectPath {
    ObjectPath::from(format!("jobs/{id}/result.csv"))
}

impl JobObjects {
    /// Local files under `root` (the layout earlier versions wrote, so their jobs stay readable),
    /// synced to disk on every write.
    pub fn local(root: &Path) -> Result<Self, ObjectsError> {
        std::fs::create_dir_all(root)?;
        let store = LocalFileSystem::new_with_prefix(root)?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        Ok(Self {
            store: Arc::new(store),
            describe: root.display().to_string(),
        })
    }

    /// An S3 bucket, with the standard `AWS_*` settings from the environment (`AWS_ENDPOINT_URL`
    /// for S3-compatible servers; plain http allowed when the endpoint says so).
    pub fn s3(address: &str) -> Result<Self, ObjectsError> {
        let rest = address
            .strip_prefix("s3://")
            .ok_or_else(|| ObjectsError::Address(address.to_string()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(ObjectsError::Address(address.to_string()));
        }
        // https to S3 goes through rustls, whose crypto here is ring (the process's default,
        // unless something installed one first).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .unwrap_or_default();
        if endpoint.starts_with("http://") {
            builder = builder.with_allow_http(true);
        }
        let s3 = builder.build()?;
        let prefix = prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        };
        Ok(Self {
            store,
            describe: address.to_string(),
        })
    }

    /// `--bulk-objects`: an `s3://` address, else local files under `local_root`.
    pub fn open(address: Option<&str>, local_root: &Path) -> Result<Self, ObjectsError> {
        match address {
            Some(a) if !a.is_empty() => Self::s3(a),
            _ => Self::local(local_root),
        }
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    pub async fn put_input(&self, id: &str, upload: Bytes) -> Result<(), ObjectsError> {
        self.store
            .put(&input_path(id), PutPayload::from_bytes(upload))
            .await?;
        Ok(())
    }

    /// Bytes `range` of a job's upload: one chunk's rows.
    pub async fn input_range(&self, id: &str, range: Range<u64>) -> Result<Bytes, ObjectsError> {
        Ok(self.store.get_range(&input_path(id), range).await?)
    }

    pub async fn input(&self, id: &str) -> Result<Bytes, ObjectsError> {
        Ok(self.store.get(&input_path(id)).await?.bytes().await?)
    }

    pub async fn put_chunk(&self, id: &str, index: u64, rows: Vec<u8>) -> Result<(), ObjectsError> {
        self.store
            .put(&chunk_path(id, index), PutPayload::from(rows))
            .await?;
        Ok(())
    }

    pub async fn put_errors(
        &self,
        id: &str,
        index: u64,
        lines: Vec<u8>,
    ) -> Result<(), ObjectsError> {
        self.store
            .put(&errors_path(id, index), PutPayload::from(lines))
            .await?;
        Ok(())
    }

    pub async fn chunk(&self, id: &str, index: u64) -> Result<Bytes, ObjectsError> {
        Ok(self
            .store
            .get(&chunk_path(id, index))
            .await?
            .bytes()
            .await?)
    }

    /// `header`, then the chunks `indices`' objects of `part` in order, one chunk in memory at a
    /// time. The first object is fetched before this returns, so a store that cannot serve it
    /// is an error for the caller to answer, not a body cut off after its status line.
    pub async fn parts_stream(
        &self,
        id: &str,
        indices: Vec<u64>,
        part: ChunkPart,
        header: &'static [u8],
    ) -> Result<ObjectStream, ObjectsError> {
        let store = self.store.clone();
        let id = id.to_string();
        let path = move |index| match part {
            ChunkPart::Results => chunk_path(&id, index),
            ChunkPart::Errors => errors_path(&id, index),
        };
        let mut indices = indices.into_iter();
        let first = match indices.next() {
            Some(index) => Some(store.get(&path(index)).await?.bytes().await?),
            None => None,
        };
        let head = (!header.is_empty()).then(|| Bytes::from_static(header));
        let rest = futures_util::stream::iter(indices).then(move |index| {
            let (store, path) = (store.clone(), path(index));
            async move { Ok(store.get(&path).await?.bytes().await?) }
        });
        Ok(
            futures_util::stream::iter(head.into_iter().chain(first).map(Ok))
                .chain(rest)
                .boxed(),
        )
    }

    /// A CSV job's result: the header, then each of its `chunks` in order; a job from before
    /// chunked results streams its whole result file. Opened as [`Self::parts_stream`] is.
    pub async fn result_stream(
        &self,
        id: &str,
        chunks: u64,
        header: &'static [u8],
    ) -> Result<ObjectStream, ObjectsError> {
        if chunks == 0 {
            let legacy = self.store.get(&legacy_result_path(id)).await?;
            return Ok(legacy.into_stream().map_err(Into::into).boxed());
        }
        self.parts_stream(id, (0..chunks).collect(), ChunkPart::Results, header)
            .await
    }

    /// A file uploaded to `/v1/files`.
    pub async fn put_file(&self, id: &str, bytes: Bytes) -> Result<(), ObjectsError> {
        self.store
            .put(&file_path(id), PutPayload::from_bytes(bytes))
            .await?;
        Ok(())
    }

    pub async fn file(&self, id: &str) -> Result<Bytes, ObjectsError> {
        Ok(self.store.get(&file_path(id)).await?.bytes().await?)
    }

    pub async fn delete_file(&self, id: &str) -> Result<(), ObjectsError> {
        match self.store.delete(&file_path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every object of a job.
    pub async fn delete_job(&self, id: &str) -> Result<(), ObjectsError> {
        let prefix = job_prefix(id);
        let locations = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .boxed();
        let mut deleted = self.store.delete_stream(locations);
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Whether the store answers (a missing object is an answer).
    pub async fn ping(&self) -> Result<(), ObjectsError> {
        match self
            .store
            .head(&ObjectPath::from("embedd-ready-probe"))
            .await
        {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stream_in_order_after_the_header_and_a_job_deletes_whole() {
        let dir = std::env::temp_dir().join(format!("embedd-objects-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let objects = JobObjects::local(&dir).unwrap();
            objects
                .put_input("j1", Bytes::from_static(b"text\na\nb\n"))
                .await
                .unwrap();
            assert_eq!(&objects.input_range("j1", 5..7).await.unwrap()[..], b"a\n");
            // Written out of order, as replicas finish them.
            objects.put_chunk("j1", 1, b"b,1\n".to_vec()).await.unwrap();
            objects.put_chunk("j1", 0, b"a,0\n".to_vec()).await.unwrap();
            let all: Vec<Bytes> = objects
                .result_stream("j1", 2, b"h\n")
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            assert_eq!(all.concat(), b"h\na,0\nb,1\n");
            // A job finished before results were chunked: its one result file, as written.
            std::fs::create_dir_all(dir.join("jobs/old")).unwrap();
            std::fs::write(dir.join("jobs/old/result.csv"), b"text,embedding\nx,1\n").unwrap();
            let old: Vec<Bytes> = objects
                .result_stream("old", 0, b"unused\n")
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            assert_eq!(old.concat(), b"text,embedding\nx,1\n");
            objects.delete_job("j1").await.unwrap();
            assert!(objects.chunk("j1", 0).await.unwrap_err().is_not_found());
            objects.ping().await.unwrap();
        });
        assert!(JobObjects::s3("gs://x").is_err());
        assert!(JobObjects::s3("s3://").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
