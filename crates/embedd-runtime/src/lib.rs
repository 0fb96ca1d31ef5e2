//! embedd's model runtime: model directories (local or from the hub), tokenization, backbones,
//! heads, execution plans, kernels, and the [`BatchScheduler`] every served model runs behind.
//!
//! How a model is put together:
//! - [`models::ArchitectureConfig`]: `config.json`, read once into the family it names;
//! - [`ExecutionPlan`]: device, storage dtype and executor, chosen once at load;
//! - [`models::load_backbone`]: builds any family under a plan; every [`models::Backbone`] takes
//!   a [`batch::PackedBatch`] and gives [`batch::Hidden`];
//! - [`heads`]: pooling, the classifier, the ColBERT projection, each reading any backbone's
//!   [`batch::Hidden`];
//! - the served kinds ([`TextEmbedder`], [`CrossEncoder`], [`ColbertModel`]) join a backbone, a
//!   head and a tokenizer behind a [`BatchScheduler`].
//!
//! Nothing here knows about HTTP. The server hands texts in and gets vectors back.

pub mod activation;
pub mod allocator;
pub mod batch;
pub mod checkpoint;
pub mod colbert;
pub mod device;
pub mod embedder;
pub mod error;
pub mod heads;
pub mod images;
pub mod kernels;
pub mod model_dir;
pub mod models;
pub mod plan;
pub mod reranker;
pub mod safetensors_files;
pub mod scheduler;
pub mod tokenize;

pub use colbert::{max_sim, ColbertModel, Side, TokenVectors};
pub use device::{DeviceSpec, Precision};
pub use embedder::{Embedded, TextEmbedder};
pub use error::RuntimeError;
pub use heads::Pooling;
pub use model_dir::{ModelDir, ModelSource};
pub use models::Family;
pub use plan::{ExecutionPlan, Executor, FusedProducts};
pub use reranker::{CrossEncoder, Scored};
pub use scheduler::{
    BatchScheduler, HealthReport, Incident, Priority, SchedulerConfig, TokenCost, WorkerState,
};
pub use tokenize::{TextTokenizer, TokenSequence};
