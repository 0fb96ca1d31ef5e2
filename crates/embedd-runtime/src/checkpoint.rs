//! The one loading path every served kind shares: a model's files, its architecture config,
//! its input limit, the execution plan and the backbone, the tokenizer.

use crate::batch::PackedBatch;
use crate::device::{DeviceSpec, Precision};
use crate::error::Result;
use crate::model_dir::{ModelDir, ModelSource};
use crate::models::int8::{Int8Calibration, CALIBRATION_TEXTS};
use crate::models::{load_backbone, ArchitectureConfig, Backbone, Weights};
use crate::plan::ExecutionPlan;
use crate::tokenize::{TextTokenizer, TokenSequence};

/// The input length served when neither the catalog nor the model's files name one and the
/// architecture has no position table (T5).
const DEFAULT_MAX_TOKENS: usize = 512;
/// The longest calibration input, in tokens.
const CALIBRATION_TOKENS: usize = 128;

/// A model's files and what its `config.json` says, read once.
pub struct Checkpoint {
    pub dir: ModelDir,
    pub config: ArchitectureConfig,
}

/// A backbone ready to run, with the plan it was built for.
pub struct LoadedBackbone {
    pub plan: ExecutionPlan,
    /// The tensors the backbone was built from, for the heads to read.
    pub weights: Weights,
    pub backbone: Box<dyn Backbone>,
}

impl Checkpoint {
    /// Resolves the files (`extra` names optional ones to look for) and reads the config.
    pub fn open(source: &ModelSource, extra: &[&str]) -> Result<Self> {
        Self::open_showing(source, extra, false)
    }

    /// [`Self::open`], with a progress bar on the terminal for each file it downloads; the
    /// files the config names (task adapters) come with the rest.
    pub fn open_showing(source: &ModelSource, extra: &[&str], progress: bool) -> Result<Self> {
        let mut dir = ModelDir::resolve_showing(source, extra, progress)?;
        let config = ArchitectureConfig::read(&dir)?;
        dir.fetch_extra(&config.extra_files(), progress)?;
        Ok(Self { dir, config })
    }

    /// The longest input served: what the catalog or command line asked for, else the model's
    /// own sentence-transformers setting, else its position table's length; never past the
    /// position table.
    pub fn max_tokens(&self, requested: Option<usize>) -> usize {
        let positions = self.config.max_positions();
        requested
            .or(self.dir.sentence_transformers.max_seq_length)
            .or(positions)
            .unwrap_or(DEFAULT_MAX_TOKENS)
            .min(positions.unwrap_or(usize::MAX))
    }

    /// The plan for `device` and `precision`, and the backbone built under it. An int8
    /// backbone is calibrated before it is returned (see [`crate::models::int8`]).
    pub fn load(&self, device: DeviceSpec, precision: Precision) -> Result<LoadedBackbone> {
        let plan = ExecutionPlan::resolve(device, precision)?;
        let weights = Weights::open(&self.dir, &plan)?;
        let (backbone, calibration) =
            Int8Calibration::collect(|| load_backbone(&weights, &self.config, &plan));
        let backbone = backbone?;
        if !calibration.is_empty() {
            self.calibrate(backbone.as_ref())?;
        }
        calibration.finish();
        Ok(LoadedBackbone {
            plan,
            weights,
            backbone,
        })
    }

    /// Runs the calibration texts through `backbone` (its int8 layers still in float32), a
    /// few at a time to keep the pass's memory small.
    fn calibrate(&self, backbone: &dyn Backbone) -> Result<()> {
        let tokenizer = self.tokenizer(self.max_tokens(None).min(CALIBRATION_TOKENS))?;
        let texts: Vec<String> = CALIBRATION_TEXTS.iter().map(|t| t.to_string()).collect();
        let sequences = tokenizer.encode_batch(&texts, true)?;
        for chunk in sequences.chunks(8) {
            let batch = PackedBatch::new(chunk.iter().collect(), tokenizer.pad_id());
            backbone.forward(&batch)?;
        }
        Ok(())
    }

    pub fn tokenizer(&self, max_tokens: usize) -> Result<TextTokenizer> {
        TextTokenizer::from_file(&self.dir.tokenizer, max_tokens)
    }
}

/// A short real input for the forward pass every model runs once at load, so a checkpoint that
/// loads but cannot run fails at start-up rather than on the first request, and the first
/// request does not pay for first-touch page faults.
pub fn warm_up_sequence(tokenizer: &TextTokenizer) -> Result<TokenSequence> {
    let mut sequences = tokenizer.encode_batch_flagged(&["warm-up".to_string()], true)?;
    Ok(sequences.remove(0).0)
}
