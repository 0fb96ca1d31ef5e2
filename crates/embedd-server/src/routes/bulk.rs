//! The bulk-embeddings routes: upload, status, download link, and the signed download itself.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use embedd_api::{
    BulkJob, BulkJobStatus, DownloadResult, ModelKind, ValidationError, ValidationErrors,
};
use embedd_bulk::store::JobRecord;
use embedd_bulk::{csv_input, new_job_id, JobKind, NewJob, RESULT_HEADER};
use serde::Deserialize;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

fn field_error(field: &str, msg: impl AsRef<str>) -> ApiError {
    ValidationErrors::single(ValidationError::value(
        vec!["body".into(), field.into()],
        msg,
    ))
    .into()
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        field_error(
            "file",
            format!("could not read the multipart upload: {}", e.body_text()),
        )
    }
}

/// A plausible address (what pydantic's EmailStr would accept in the common cases).
fn valid_email(s: &str) -> bool {
    let mut parts = s.split('@');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(local), Some(domain), None) => {
            !local.is_empty()
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && domain.contains('.')
                && !s.chars().any(char::is_whitespace)
        }
        _ => false,
    }
}

/// Upload a CSV (one text per row) and get embeddings for each row as a background job.
#[utoipa::path(
    post, path = "/v1/bulk-embeddings", tag = "bulk-embeddings",
    request_body(content_type = "multipart/form-data", description = "`file` (CSV), `model`, optional `email`"),
    responses(
        (status = 200, description = "Start a bulk embedding job", body = BulkJob),
        (status = 413, description = "Upload too large", body = embedd_api::ErrorBody),
        (status = 422, description = "Validation Error", body = ValidationErrors),
    ),
    security(("bearer" = []))
)]
pub async fn start(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    mut multipart: Multipart,
) -> Result<Json<BulkJob>, ApiError> {
    let limit = state.limits.max_upload_bytes;
    let read = async {
        let (mut file, mut model, mut email) = (None, None, None);
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| multipart_error(e, limit))?
        {
            match field.name().unwrap_or_default() {
                "file" => {
                    let name = field.file_name().unwrap_or("input.csv").to_string();
                    let bytes = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
                    file = Some((name, bytes));
                }
                "model" => model = Some(field.text().await.map_err(|e| multipart_error(e, limit))?),
                "email" => email = Some(field.text().await.map_err(|e| multipart_error(e, limit))?),
                _ => {}
            }
        }
        Ok::<_, ApiError>((file, model, email))
    };
    let deadline = state.limits.upload_read_timeout;
    let (file, model, email) = tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ApiError::RequestTimeout(deadline))??;
    let mut errors = ValidationErrors::default();
    if file.is_none() {
        errors.push(ValidationError::missing(vec!["body".into(), "file".into()]));
    }
    if model.is_none() {
        errors.push(ValidationError::missing(vec![
            "body".into(),
            "model".into(),
        ]));
    }
    let email = email.filter(|e| !e.trim().is_empty());
    if let Some(e) = &email {
        if !valid_email(e.trim()) {
            errors.push(ValidationError::value(
                vec!["body".into(), "email".into()],
                format!("value is not a valid email address: '{e}'"),
            ));
        }
    }
    let (Some((file_name, bytes)), Some(model)) = (file, model) else {
        return Err(errors.into());
    };
    errors.into_result(())?;

    let capabilities = state.models.get(&model)?.capabilities.clone();
    if capabilities.kind != ModelKind::Embedding {
        return Err(field_error(
            "model",
            format!("model '{model}' is not an embedding model"),
        ));
    }
    let checked = bytes.clone();
    let chunk_rows = state.bulk.config.chunk_rows as u64;
    let summary = super::off_runtime("CSV check", move || {
        csv_input::check(&checked[..], chunk_rows)
    })
    .await?
    .map_err(|e| field_error("file", e.to_string()))?;

    let bulk = &state.bulk;
    let queued = bulk
        .store
        .unfinished_of(&caller.0)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if queued >= bulk.max_jobs_per_key {
        return Err(ApiError::Overloaded {
            message: format!(
                "this key has {queued} bulk jobs waiting or running, the limit; \
                 retry when one has finished"
            ),
            retry_after_secs: 60,
        });
    }
    // The upload is stored before the job exists: once the job is visible, it can run.
    let id = new_job_id().map_err(|e| ApiError::Internal(e.to_string()))?;
    bulk.objects
        .put_input(&id, bytes)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let job = bulk
        .store
        .create(NewJob::csv(
            id,
            caller.0.clone(),
            model,
            file_name,
            email.as_deref().map(|e| e.trim().to_string()),
            summary,
        ))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    state.bulk.wake.notify_one();
    Ok(Json(job))
}

/// The job, if it exists.
async fn find_job(state: &AppState, job_id: &str) -> Result<JobRecord, ApiError> {
    state
        .bulk
        .store
        .get(job_id)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(|| ApiError::NotFound(format!("bulk embedding job '{job_id}' not found")))
}

/// The job, if it exists and belongs to the caller.
async fn owned_job(state: &AppState, caller: &Caller, job_id: &str) -> Result<BulkJob, ApiError> {
    let record = find_job(state, job_id).await?;
    // OpenAI batches live in the same store; they are not bulk-embeddings jobs.
    if record.job.user_id != caller.0 || record.kind != JobKind::Csv {
        return Err(ApiError::NotFound(format!(
            "bulk embedding job '{job_id}' not found"
        )));
    }
    Ok(record.job)
}

/// The job as it stands.
#[utoipa::path(
    get, path = "/v1/bulk-embeddings/{job_id}", tag = "bulk-embeddings",
    params(("job_id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "Retrieve job", body = BulkJob),
        (status = 404, description = "No such job for this key", body = embedd_api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn status(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
) -> Result<Json<BulkJob>, ApiError> {
    owned_job(&state, &caller, &job_id).await.map(Json)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A signed, expiring link to the result file of a completed job.
#[utoipa::path(
    post, path = "/v1/bulk-embeddings/{job_id}/download-result", tag = "bulk-embeddings",
    params(("job_id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "Download the result of a bulk embedding job", body = DownloadResult),
        (status = 404, description = "No such job for this key", body = embedd_api::ErrorBody),
        (status = 409, description = "The job is not completed", body = embedd_api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn download_link(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
) -> Result<Json<DownloadResult>, ApiError> {
    let job = owned_job(&state, &caller, &job_id).await?;
    if job.status != BulkJobStatus::Completed {
        let detail = match job.status {
            BulkJobStatus::Failed => format!(
                "job '{job_id}' failed: {}",
                job.error.unwrap_or_default()
            ),
            s => format!(
                "job '{job_id}' is {} ({} of {} rows done); the result can be downloaded once it is completed",
                s.as_str(),
                job.processed_rows,
                job.total_rows
            ),
        };
        return Err(ApiError::Conflict(detail));
    }
    let expires = unix_now() + state.bulk.url_ttl.as_secs();
    let signature = state.bulk.signer.sign(&job_id, expires);
    // Never the Host header unless trusted: a crafted one would make links to another site.
    let host_header = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|_| state.bulk.trust_host_header)
        .map(|host| format!("http://{host}"));
    let base = state
        .bulk
        .public_url
        .clone()
        .or(host_header)
        .or_else(|| state.bulk.listen_url.get().cloned())
        .unwrap_or_else(|| "http://localhost".to_string());
    Ok(Json(DownloadResult {
        id: job_id.clone(),
        download_url: format!(
            "{base}/v1/bulk-embeddings/{job_id}/result?expires={expires}&signature={signature}"
        ),
    }))
}

#[derive(Deserialize)]
pub struct Signed {
    expires: u64,
    signature: String,
}

/// The result CSV behind a signed link (no API key needed).
pub async fn download(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    Query(signed): Query<Signed>,
) -> Result<Response, ApiError> {
    if !state
        .bulk
        .signer
        .verify(&job_id, signed.expires, &signed.signature, unix_now())
    {
        return Err(ApiError::Forbidden(
            "the download link is invalid or has expired; ask for a new one".into(),
        ));
    }
    let record = find_job(&state, &job_id).await?;
    if record.job.status != BulkJobStatus::Completed || record.kind != JobKind::Csv {
        return Err(ApiError::NotFound(format!("no result for job '{job_id}'")));
    }
    let result = state
        .bulk
        .objects
        .result_stream(&job_id, record.chunks, RESULT_HEADER)
        .await
        .map_err(|e| match e.is_not_found() {
            true => ApiError::NotFound(format!("no result for job '{job_id}'")),
            false => ApiError::Internal(e.to_string()),
        })?;
    let body = Body::from_stream(result);
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{job_id}.csv\""),
            ),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::valid_email;

    #[test]
    fn emails() {
        assert!(valid_email("a@b.co"));
        assert!(valid_email("first.last+tag@sub.example.org"));
        for bad in [
            "", "a", "a@", "@b.co", "a@b", "a@@b.co", "a b@c.de", "a@.co",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
