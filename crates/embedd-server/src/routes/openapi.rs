//! `GET /openapi.json`, generated from the same types that parse requests.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[allow(deprecated)]
#[derive(OpenApi)]
#[openapi(
    info(
        title = "embedd: the Jina Embedding Serving API",
        description = "Self-hosted server for the Jina AI Search Foundation API (contract 0.0.89)."
    ),
    paths(
        super::embeddings::create,
        super::rerank::rank,
        super::bulk::start,
        super::bulk::status,
        super::bulk::download_link,
        super::multi_vector::create,
        super::multi_vector::create_deprecated,
        super::openai_batch::upload_file,
        super::openai_batch::list_files,
        super::openai_batch::get_file,
        super::openai_batch::file_content,
        super::openai_batch::delete_file,
        super::openai_batch::create_batch,
        super::openai_batch::list_batches,
        super::openai_batch::get_batch,
        super::openai_batch::cancel_batch,
        super::health::root,
        super::health::health,
        super::health::live,
        super::health::ready,
        super::health::list_models,
        super::health::get_model,
    ),
    components(schemas(
        embedd_api::EmbedRequest,
        embedd_api::EmbedResponse,
        embedd_api::EmbeddingObject,
        embedd_api::Usage,
        embedd_api::MultiVectorRequest,
        embedd_api::MultiVectorResponse,
        embedd_api::MultiVectorObject,
        embedd_api::InputType,
        embedd_api::BulkJob,
        embedd_api::BulkJobStatus,
        embedd_api::DownloadResult,
        embedd_api::RerankRequest,
        embedd_api::RerankResponse,
        embedd_api::RerankResult,
        embedd_api::EncodingFormat,
        embedd_api::EncodingSelection,
        embedd_api::Task,
        embedd_api::ValidationErrors,
        embedd_api::ValidationError,
        embedd_api::ErrorBody,
        embedd_api::ModelList,
        embedd_api::ModelCard,
        embedd_api::openai_batch::FileObject,
        embedd_api::openai_batch::FileList,
        embedd_api::openai_batch::BatchCreate,
        embedd_api::openai_batch::Batch,
        embedd_api::openai_batch::BatchList,
        embedd_api::openai_batch::BatchStatus,
        embedd_api::openai_batch::BatchErrors,
        embedd_api::openai_batch::BatchLineError,
        embedd_api::openai_batch::BatchRequestCounts,
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// A browsable page rendered in the browser from `/openapi.json`; it loads nothing from elsewhere.
pub async fn docs_page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../../assets/docs.html"))
}
