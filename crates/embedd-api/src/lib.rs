//! The wire contract of embedd: the Jina Search Foundation API (0.0.89) request and response types,
//! their validation into FastAPI-shaped 422 bodies, and the output encodings.
//!
//! Nothing here knows about HTTP servers or models: handlers parse a JSON body with these types,
//! check it against a model's [`ModelCapabilities`], and render the result.

pub mod bulk;
pub mod embeddings;
pub mod encoding;
pub mod error;
pub mod input;
pub mod models;
pub mod multi_vector;
pub mod openai_batch;
mod reader;
pub mod rerank;

pub use bulk::{BulkJob, BulkJobStatus, DownloadResult};
pub use embeddings::{EmbedRequest, EmbedResponse, EmbeddingObject, Usage};
pub use encoding::{EncodedVector, EncodingFormat, EncodingSelection};
pub use error::{ErrorBody, LocItem, ValidationError, ValidationErrors};
pub use input::{check_input_count, check_token_budget, ImageSource, InputItem, Task};
pub use models::{ModelCapabilities, ModelCard, ModelKind, ModelList};
pub use multi_vector::{InputType, MultiVectorObject, MultiVectorRequest, MultiVectorResponse};
pub use rerank::{RerankDocument, RerankRequest, RerankResponse, RerankResult};
