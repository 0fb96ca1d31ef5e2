//! Heads: what turns a backbone's token vectors into an answer. Each reads [`Hidden`] (any
//! backbone's output, packed the same way) and knows nothing of the backbone that made it.
//!
//! [`Hidden`]: crate::batch::Hidden

pub mod classifier;
pub mod colbert;
pub mod pooling;

pub use classifier::{ClassifierHead, ScoreActivation};
pub use colbert::ColbertProjection;
pub use pooling::Pooling;
