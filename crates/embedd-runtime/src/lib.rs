//! embedd's model runtime: model directories (local or from the hub), tokenization, candle encoders,
//! pooling, devices, and the [`BatchScheduler`] every served model runs behind.
//!
//! Nothing here knows about HTTP. The server hands texts in and gets vectors back.

pub mod allocator;
pub mod batch;
pub mod colbert;
pub mod device;
pub mod embedder;
pub mod error;
pub mod kernels;
pub mod model_dir;
pub mod models;
pub mod pooling;
pub mod reranker;
pub mod scheduler;
pub mod tokenize;

pub use colbert::{max_sim, ColbertModel, Side, TokenVectors};
pub use device::{DeviceSpec, Precision};
pub use embedder::{Embedded, TextEmbedder};
pub use error::RuntimeError;
pub use model_dir::{ModelDir, ModelSource};
pub use pooling::Pooling;
pub use reranker::{CrossEncoder, Scored};
pub use scheduler::{BatchScheduler, Priority, SchedulerConfig};
pub use tokenize::{TextTokenizer, TokenSequence};
