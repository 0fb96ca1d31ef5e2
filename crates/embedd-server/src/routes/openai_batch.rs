//! The OpenAI Batch API on the bulk job engine: `/v1/files` (upload, metadata, content, delete)
//! and `/v1/batches` (create, get, list, cancel). A batch is a job whose rows are the input
//! file's request lines: workers on any replica answer its chunks as `/v1/embeddings` would, at
//! background priority, into an output file and an error file matched by `custom_id`.

use axum::body::Body;
use axum::extract::{Multipart, Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use embedd_api::openai_batch::{
    Batch, BatchCreate, BatchErrors, BatchLineError, BatchList, BatchRequestCounts, BatchStatus,
    FileList, FileObject, BATCH_ENDPOINTS, COMPLETION_WINDOWS, FILE_PURPOSES,
};
use embedd_api::{ModelKind, ValidationError, ValidationErrors};
use embedd_bulk::store::{BatchRow, DoneChunk, FileRow, JobRecord};
use embedd_bulk::{batch_input, new_job_id, ChunkPart, JobKind, NewJob};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::state::AppState;

/// The upload route shares the bulk upload's body limit (`--max-upload-bytes`).
pub const FILES_PATH: &str = "/v1/files";

const BATCH_PREFIX: &str = "batch_";
const OUTPUT_PREFIX: &str = "file-out-";
const ERRORS_PREFIX: &str = "file-err-";
/// A batch's output files are kept as long as the batch; this is what OpenAI promises for
/// completing one.
const COMPLETION_WINDOW_SECS: i64 = 24 * 3600;

fn field_error(field: &str, msg: impl AsRef<str>) -> ApiError {
    ValidationErrors::single(ValidationError::value(
        vec!["body".into(), field.into()],
        msg,
    ))
    .into()
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Upload a file (`purpose=batch`: a batch's JSONL input).
#[utoipa::path(
    post, path = "/v1/files", tag = "batches",
    request_body(content_type = "multipart/form-data", description = "`file`, `purpose` (batch)"),
    responses(
        (status = 200, description = "The stored file", body = FileObject),
        (status = 413, description = "Upload too large", body = embedd_api::ErrorBody),
        (status = 422, description = "Validation Error", body = ValidationErrors),
    ),
    security(("bearer" = []))
)]
pub async fn upload_file(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    mut multipart: Multipart,
) -> Result<Json<FileObject>, ApiError> {
    let limit = state.limits.max_upload_bytes;
    let read_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            field_error(
                "file",
                format!("could not read the multipart upload: {}", e.body_text()),
            )
        }
    };
    let read = async {
        let (mut file, mut purpose) = (None, None);
        while let Some(field) = multipart.next_field().await.map_err(read_error)? {
            match field.name().unwrap_or_default() {
                "file" => {
                    let name = field.file_name().unwrap_or("input.jsonl").to_string();
                    file = Some((name, field.bytes().await.map_err(read_error)?));
                }
                "purpose" => purpose = Some(field.text().await.map_err(read_error)?),
                _ => {}
            }
        }
        Ok::<_, ApiError>((file, purpose))
    };
    let deadline = state.limits.upload_read_timeout;
    let (file, purpose) = tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ApiError::RequestTimeout(deadline))??;
    let mut errors = ValidationErrors::default();
    if file.is_none() {
        errors.push(ValidationError::missing(vec!["body".into(), "file".into()]));
    }
    match &purpose {
        None => errors.push(ValidationError::missing(vec![
            "body".into(),
            "purpose".into(),
        ])),
        Some(p) if !FILE_PURPOSES.contains(&p.as_str()) => errors.push(ValidationError::value(
            vec!["body".into(), "purpose".into()],
            format!("purpose must be one of {FILE_PURPOSES:?}, not '{p}'"),
        )),
        Some(_) => {}
    }
    let (Some((filename, bytes)), Some(purpose)) = (file, purpose) else {
        return Err(errors.into());
    };
    errors.into_result(())?;

    let id = format!("file-{}", new_job_id().map_err(internal)?);
    let row = FileRow {
        id: id.clone(),
        user_id: caller.0.clone(),
        purpose,
        filename,
        bytes: bytes.len() as u64,
        created_unix: unix_now(),
    };
    state
        .bulk
        .objects
        .put_file(&id, bytes)
        .await
        .map_err(internal)?;
    state
        .bulk
        .store
        .create_file(row.clone())
        .await
        .map_err(internal)?;
    Ok(Json(file_object(&row)))
}

fn file_object(row: &FileRow) -> FileObject {
    FileObject {
        id: row.id.clone(),
        object: "file",
        bytes: row.bytes,
        created_at: row.created_unix,
        filename: row.filename.clone(),
        purpose: row.purpose.clone(),
        status: "processed",
    }
}

/// The caller's uploaded files, newest first (at most 10,000; `limit` lowers that).
#[utoipa::path(
    get, path = "/v1/files", tag = "batches",
    params(("limit" = Option<u64>, Query, description = "At most this many (1-10000, default 10000)")),
    responses(
        (status = 200, description = "Files", body = FileList),
        (status = 422, description = "Validation Error", body = ValidationErrors),
    ),
    security(("bearer" = []))
)]
pub async fn list_files(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> Result<Json<FileList>, ApiError> {
    let query = ListQuery::parse(raw.as_deref());
    let limit = query_limit(query.limit.as_deref(), 10_000, 10_000)?;
    let mut rows = state
        .bulk
        .store
        .list_files(&caller.0, limit + 1)
        .await
        .map_err(internal)?;
    let has_more = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(FileList {
        object: "list",
        data: rows.iter().map(file_object).collect(),
        has_more,
    }))
}

/// `limit` from a query string: `default` when absent, else an integer from 1 to `max`, else a
/// 422 naming it.
fn query_limit(raw: Option<&str>, default: u64, max: u64) -> Result<u64, ApiError> {
    match raw {
        None => Ok(default),
        Some(raw) => match raw.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ValidationErrors::single(ValidationError::value(
                vec!["query".into(), "limit".into()],
                format!("limit must be an integer from 1 to {max}, not '{raw}'"),
            ))
            .into()),
        },
    }
}

/// What a file id names: an upload, or a batch's output or error file.
enum StoredFile {
    Upload(FileRow),
    BatchPart {
        record: Box<JobRecord>,
        part: ChunkPart,
        chunks: Vec<DoneChunk>,
    },
}

fn file_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("file '{id}' not found"))
}

async fn find_file(state: &AppState, caller: &Caller, id: &str) -> Result<StoredFile, ApiError> {
    let batch_part = [
        (OUTPUT_PREFIX, ChunkPart::Results),
        (ERRORS_PREFIX, ChunkPart::Errors),
    ]
    .into_iter()
    .find_map(|(prefix, part)| id.strip_prefix(prefix).map(|job| (job, part)));
    if let Some((job_id, part)) = batch_part {
        let (record, _) = owned_batch(state, caller, job_id)
            .await
            .map_err(|_| file_not_found(id))?;
        let (output, errors) = result_files(&record);
        if (part == ChunkPart::Results && output.is_none())
            || (part == ChunkPart::Errors && errors.is_none())
        {
            return Err(file_not_found(id));
        }
        let chunks = state
            .bulk
            .store
            .done_chunks(&record.job.id)
            .await
            .map_err(internal)?;
        return Ok(StoredFile::BatchPart {
            record: Box::new(record),
            part,
            chunks,
        });
    }
    match state.bulk.store.get_file(id).await.map_err(internal)? {
        Some(row) if row.user_id == caller.0 => Ok(StoredFile::Upload(row)),
        _ => Err(file_not_found(id)),
    }
}

fn part_bytes(chunk: &DoneChunk, part: ChunkPart) -> u64 {
    match part {
        ChunkPart::Results => chunk.result_bytes,
        ChunkPart::Errors => chunk.error_bytes,
    }
}

/// A file's metadata.
#[utoipa::path(
    get, path = "/v1/files/{file_id}", tag = "batches",
    params(("file_id" = String, Path, description = "The file id")),
    responses(
        (status = 200, description = "The file", body = FileObject),
        (status = 404, description = "No such file for this key", body = embedd_api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_file(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(file_id): Path<String>,
) -> Result<Json<FileObject>, ApiError> {
    Ok(Json(match find_file(&state, &caller, &file_id).await? {
        StoredFile::Upload(row) => file_object(&row),
        StoredFile::BatchPart {
            record,
            part,
            chunks,
        } => {
            let (what, purpose) = match part {
                ChunkPart::Results => ("output", "batch_output"),
                ChunkPart::Errors => ("error", "batch_output"),
            };
            FileObject {
                id: file_id,
                object: "file",
                bytes: chunks.iter().map(|c| part_bytes(c, part)).sum(),
                created_at: record.completed_unix.unwrap_or(record.created_unix),
                filename: format!("{BATCH_PREFIX}{}_{what}.jsonl", record.job.id),
                purpose: purpose.into(),
                status: "processed",
            }
        }
    }))
}

/// A file's bytes: an upload as stored, or a batch's output or error lines in input order.
#[utoipa::path(
    get, path = "/v1/files/{file_id}/content", tag = "batches",
    params(("file_id" = String, Path, description = "The file id")),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream"),
        (status = 404, description = "No such file for this key", body = embedd_api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn file_content(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(file_id): Path<String>,
) -> Result<Response, ApiError> {
    let body = match find_file(&state, &caller, &file_id).await? {
        StoredFile::Upload(row) => {
            let bytes =
                state
                    .bulk
                    .objects
                    .file(&row.id)
                    .await
                    .map_err(|e| match e.is_not_found() {
                        true => file_not_found(&file_id),
                        false => internal(e),
                    })?;
            Body::from(bytes)
        }
        StoredFile::BatchPart {
            record,
            part,
            chunks,
        } => {
            let indices = chunks
                .iter()
                .filter(|c| part_bytes(c, part) > 0)
                .map(|c| c.index)
                .collect();
            let stream = state
                .bulk
                .objects
                .parts_stream(&record.job.id, indices, part, b"")
                .await
                .map_err(internal)?;
            Body::from_stream(stream)
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// Deletes an uploaded file (batches made from it keep their own copy).
#[utoipa::path(
    delete, path = "/v1/files/{file_id}", tag = "batches",
    params(("file_id" = String, Path, description = "The file id")),
    responses(
        (status = 200, description = "Deleted", body = Object),
        (status = 404, description = "No such file for this key", body = embedd_api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_file(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(file_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let StoredFile::Upload(row) = find_file(&state, &caller, &file_id).await? else {
        return Err(ApiError::Conflict(format!(
            "file '{file_id}' is a batch's result: it goes when the batch does"
        )));
    };
    state
        .bulk
        .objects
        .delete_file(&row.id)
        .await
        .map_err(internal)?;
    state
        .bulk
        .store
        .delete_file(&row.id)
        .await
        .map_err(internal)?;
    Ok(Json(
        json!({"id": row.id, "object": "file", "deleted": true}),
    ))
}

/// The batch, if it exists and belongs to the caller.
async fn owned_batch(
    state: &AppState,
    caller: &Caller,
    job_id: &str,
) -> Result<(JobRecord, BatchRow), ApiError> {
    let not_found = || ApiError::NotFound(format!("batch '{BATCH_PREFIX}{job_id}' not found"));
    match state.bulk.store.get_batch(job_id).await.map_err(internal)? {
        Some((record, row)) if record.job.user_id == caller.0 && record.kind == JobKind::Batch => {
            Ok((record, row))
        }
        _ => Err(not_found()),
    }
}

fn job_id_of(batch_id: &str) -> Result<&str, ApiError> {
    batch_id
        .strip_prefix(BATCH_PREFIX)
        .ok_or_else(|| ApiError::NotFound(format!("batch '{batch_id}' not found")))
}

/// The output and error file ids a batch has now: output once it has finished (or been
/// cancelled) with answers, errors once any request failed.
fn result_files(record: &JobRecord) -> (Option<String>, Option<String>) {
    let finished = matches!(record.state.as_str(), "completed" | "cancelled");
    let answered = record.job.processed_rows.saturating_sub(record.failed_rows);
    let output = (finished && answered > 0).then(|| format!("{OUTPUT_PREFIX}{}", record.job.id));
    let errors =
        (finished && record.failed_rows > 0).then(|| format!("{ERRORS_PREFIX}{}", record.job.id));
    (output, errors)
}

fn batch_object(record: &JobRecord, row: &BatchRow) -> Batch {
    let status = match record.state.as_str() {
        "waiting" | "in-progress" => BatchStatus::InProgress,
        "completed" => BatchStatus::Completed,
        "cancelled" => BatchStatus::Cancelled,
        _ => BatchStatus::Failed,
    };
    let errors = row
        .errors
        .as_deref()
        .and_then(|e| serde_json::from_str::<Vec<BatchLineError>>(e).ok())
        .map(|data| BatchErrors {
            object: "list",
            data,
        });
    let (output_file_id, error_file_id) = result_files(record);
    let finished_at = |s: BatchStatus| (status == s).then_some(record.completed_unix).flatten();
    Batch {
        id: format!("{BATCH_PREFIX}{}", record.job.id),
        object: "batch",
        endpoint: row.endpoint.clone(),
        // A batch refused at validation never ran.
        in_progress_at: errors.is_none().then_some(record.created_unix),
        errors,
        input_file_id: row.input_file_id.clone(),
        completion_window: row.completion_window.clone(),
        status,
        output_file_id,
        error_file_id,
        created_at: record.created_unix,
        expires_at: Some(record.created_unix + COMPLETION_WINDOW_SECS),
        finalizing_at: finished_at(BatchStatus::Completed),
        completed_at: finished_at(BatchStatus::Completed),
        failed_at: finished_at(BatchStatus::Failed),
        expired_at: None,
        cancelling_at: row.cancelled_unix,
        cancelled_at: row.cancelled_unix,
        request_counts: BatchRequestCounts {
            total: record.job.total_rows,
            completed: record.job.processed_rows.saturating_sub(record.failed_rows),
            failed: record.failed_rows,
        },
        metadata: row
            .metadata
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok()),
    }
}

/// Create a batch from an uploaded JSONL file of `/v1/embeddings` requests.
#[utoipa::path(
    post, path = "/v1/batches", tag = "batches",
    request_body = BatchCreate,
    responses(
        (status = 200, description = "The batch (failed, with line errors, when its input is refused)", body = Batch),
        (status = 404, description = "No such input file for this key", body = embedd_api::ErrorBody),
        (status = 422, description = "Validation Error", body = ValidationErrors),
    ),
    security(("bearer" = []))
)]
pub async fn create_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody,
) -> Result<Json<Batch>, ApiError> {
    let request: BatchCreate = serde_json::from_value(body).map_err(|e| {
        ApiError::Validation(ValidationErrors::single(ValidationError::value(
            vec!["body".into()],
            format!("not a batch request: {e}"),
        )))
    })?;
    if !BATCH_ENDPOINTS.contains(&request.endpoint.as_str()) {
        return Err(field_error(
            "endpoint",
            format!(
                "endpoint must be one of {BATCH_ENDPOINTS:?}, not '{}'",
                request.endpoint
            ),
        ));
    }
    if !COMPLETION_WINDOWS.contains(&request.completion_window.as_str()) {
        return Err(field_error(
            "completion_window",
            format!(
                "completion_window must be one of {COMPLETION_WINDOWS:?}, not '{}'",
                request.completion_window
            ),
        ));
    }
    let file = match state.bulk.store.get_file(&request.input_file_id).await {
        Ok(Some(f)) if f.user_id == caller.0 => f,
        Ok(_) => return Err(file_not_found(&request.input_file_id)),
        Err(e) => return Err(internal(e)),
    };
    if file.purpose != "batch" {
        return Err(field_error(
            "input_file_id",
            format!("file '{}' was not uploaded with purpose 'batch'", file.id),
        ));
    }
    let bulk = state.bulk.clone();
    let bytes = bulk.objects.file(&file.id).await.map_err(internal)?;
    let (checked, endpoint) = (bytes.clone(), request.endpoint.clone());
    let chunk_rows = bulk.config.chunk_rows as u64;
    let plan = super::off_runtime("batch input check", move || {
        batch_input::check(&checked, &endpoint, chunk_rows)
    })
    .await?;
    // A model no replica here serves would wait for ever: refuse it now, as a line error.
    let plan = plan.and_then(|plan| {
        let served = state
            .models
            .get(&plan.model)
            .is_ok_and(|m| m.capabilities.kind == ModelKind::Embedding);
        if served {
            Ok(plan)
        } else {
            Err(vec![BatchLineError {
                code: "model_not_found".into(),
                message: format!(
                    "model '{}' is not an embedding model served here",
                    plan.model
                ),
                param: Some("body.model".into()),
                line: Some(1),
            }])
        }
    });
    let job_id = new_job_id().map_err(internal)?;
    let metadata = request
        .metadata
        .as_ref()
        .map(|m| serde_json::to_string(m).unwrap_or_default());
    let mut new = NewJob {
        id: job_id.clone(),
        kind: JobKind::Batch,
        user_id: caller.0.clone(),
        model_name: String::new(),
        file_name: file.filename.clone(),
        user_email: None,
        rows: 0,
        text_column: 0,
        chunks: Vec::new(),
    };
    let mut row = BatchRow {
        input_file_id: file.id.clone(),
        endpoint: request.endpoint.clone(),
        completion_window: request.completion_window.clone(),
        metadata,
        errors: None,
        cancelled_unix: None,
    };
    match plan {
        Ok(plan) => {
            // The batch keeps its own copy of the input: deleting the file does not stop it.
            bulk.objects
                .put_input(&job_id, bytes)
                .await
                .map_err(internal)?;
            new.model_name = plan.model;
            new.rows = plan.requests;
            new.chunks = plan.chunks;
        }
        Err(errors) => row.errors = Some(serde_json::to_string(&errors).map_err(internal)?),
    }
    bulk.store.create_batch(new, row).await.map_err(internal)?;
    bulk.wake.notify_one();
    let (record, row) = owned_batch(&state, &caller, &job_id).await?;
    Ok(Json(batch_object(&record, &row)))
}

/// A batch as it stands.
#[utoipa::path(
    get, path = "/v1/batches/{batch_id}", tag = "batches",
    params(("batch_id" = String, Path, description = "The batch id")),
    responses(
        (status = 200, description = "The batch", body = Batch),
        (status = 404, description = "No such batch for this key", body = embedd_api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(batch_id): Path<String>,
) -> Result<Json<Batch>, ApiError> {
    let (record, row) = owned_batch(&state, &caller, job_id_of(&batch_id)?).await?;
    Ok(Json(batch_object(&record, &row)))
}

/// Cancels a batch: no more of its requests run; the answers so far stay in its output file.
#[utoipa::path(
    post, path = "/v1/batches/{batch_id}/cancel", tag = "batches",
    params(("batch_id" = String, Path, description = "The batch id")),
    responses(
        (status = 200, description = "The batch, cancelled", body = Batch),
        (status = 404, description = "No such batch for this key", body = embedd_api::ErrorBody),
        (status = 409, description = "The batch has already finished", body = embedd_api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(batch_id): Path<String>,
) -> Result<Json<Batch>, ApiError> {
    let job_id = job_id_of(&batch_id)?;
    let (record, _) = owned_batch(&state, &caller, job_id).await?;
    if !state.bulk.store.cancel(job_id).await.map_err(internal)? && record.state != "cancelled" {
        return Err(ApiError::Conflict(format!(
            "batch '{batch_id}' has already finished ({})",
            record.state
        )));
    }
    let (record, row) = owned_batch(&state, &caller, job_id).await?;
    Ok(Json(batch_object(&record, &row)))
}

/// `after` and `limit`, read by hand from the query string: a bad `limit` is a 422 naming it, as
/// FastAPI answers, and a repeated parameter takes its last value.
#[derive(Default)]
struct ListQuery {
    after: Option<String>,
    limit: Option<String>,
}

impl ListQuery {
    fn parse(raw: Option<&str>) -> Self {
        let mut query = Self::default();
        for (key, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "after" => query.after = Some(value.into_owned()),
                "limit" => query.limit = Some(value.into_owned()),
                _ => {}
            }
        }
        query
    }
}

/// The caller's batches, newest first (`after`: a batch id to continue after; `limit` 1-100,
/// default 20; other values: 422).
#[utoipa::path(
    get, path = "/v1/batches", tag = "batches",
    params(
        ("after" = Option<String>, Query, description = "Continue after this batch id"),
        ("limit" = Option<u64>, Query, description = "At most this many (1-100, default 20)"),
    ),
    responses(
        (status = 200, description = "Batches", body = BatchList),
        (status = 422, description = "Validation Error", body = ValidationErrors),
    ),
    security(("bearer" = []))
)]
pub async fn list_batches(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> Result<Json<BatchList>, ApiError> {
    let query = ListQuery::parse(raw.as_deref());
    let limit = query_limit(query.limit.as_deref(), 20, 100)?;
    let after = query
        .after
        .as_deref()
        .map(|a| a.strip_prefix(BATCH_PREFIX).unwrap_or(a).to_string());
    // One more than asked tells whether there are more.
    let mut rows = state
        .bulk
        .store
        .list_batches(&caller.0, after.as_deref(), limit + 1)
        .await
        .map_err(internal)?;
    let has_more = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    let data: Vec<Batch> = rows
        .iter()
        .filter(|(record, _)| record.kind == JobKind::Batch)
        .map(|(record, row)| batch_object(record, row))
        .collect();
    Ok(Json(BatchList {
        object: "list",
        first_id: data.first().map(|b| b.id.clone()),
        last_id: data.last().map(|b| b.id.clone()),
        has_more,
        data,
    }))
}
