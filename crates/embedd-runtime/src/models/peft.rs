//! PEFT LoRA adapters saved beside a base model, one directory per task
//! (jina-embeddings-v5-text: `adapters/<task>/adapter_config.json` + `adapter_model.safetensors`,
//! tensors `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`).
//! With task `t`, a targeted Linear's weight becomes `W + scaling · B · A`, `scaling` being
//! `lora_alpha / r` (`/ √r` with rsLoRA).
//!
//! The served tasks' adapters are stacked into one [`LinearLora`] per product, so one copy of the
//! base weights serves every task and rows of different tasks share a batch. Where a product
//! concatenates several modules' outputs (`[q | k | v]`, `[gate | up]`), each task's update is the
//! modules' A matrices stacked over one block-diagonal B; tasks of smaller rank, and modules a
//! task does not target, are zero-padded. `scaling` is folded into B.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::lora::LinearLora;
use crate::error::{Result, RuntimeError};
use crate::model_dir::read_json;

/// One task's adapter: its update matrices by module path, float32 on the CPU until stacked.
pub struct PeftAdapter {
    /// `module -> (A [r, in], B [out, r])`.
    modules: HashMap<String, (Tensor, Tensor)>,
    scaling: f64,
}

/// The relative names of task `name`'s two files.
pub fn adapter_files(name: &str) -> [String; 2] {
    [
        format!("adapters/{name}/adapter_config.json"),
        format!("adapters/{name}/adapter_model.safetensors"),
    ]
}

impl PeftAdapter {
    /// Reads a PEFT LoRA adapter; `known` tells which module paths the base model has, and any
    /// other target (an embedding, a head) is refused rather than silently left out.
    pub fn open(config: &Path, weights: &Path, known: impl Fn(&str) -> bool) -> Result<Self> {
        let raw = read_json(config)?;
        let refuse = |field: &str, reason: String| RuntimeError::ModelConfig {
            path: config.to_path_buf(),
            field: field.into(),
            reason,
        };
        let text = |k: &str| raw.get(k).and_then(Value::as_str);
        if text("peft_type") != Some("LORA") {
            return Err(refuse("peft_type", "only LORA adapters are served".into()));
        }
        let truthy = |k: &str| raw.get(k).and_then(Value::as_bool).unwrap_or(false);
        for field in ["use_dora", "fan_in_fan_out"] {
            if truthy(field) {
                return Err(refuse(field, "is not supported".into()));
            }
        }
        let non_empty = |k: &str| match raw.get(k) {
            None | Some(Value::Null) => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        for field in ["modules_to_save", "rank_pattern", "alpha_pattern"] {
            if non_empty(field) {
                return Err(refuse(field, "is not supported".into()));
            }
        }
        if text("bias").is_some_and(|b| b != "none") {
            return Err(refuse("bias", "only 'none' is supported".into()));
        }
        let rank = raw
            .get("r")
            .and_then(Value::as_f64)
            .filter(|r| *r > 0.0)
            .ok_or_else(|| refuse("r", "missing or not positive".into()))?;
        let alpha = raw
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| refuse("lora_alpha", "missing".into()))?;
        let scaling = match truthy("use_rslora") {
            true => alpha / rank.sqrt(),
            false => alpha / rank,
        };

        let file_error = |reason: String| RuntimeError::ModelFile {
            path: weights.to_path_buf(),
            reason,
        };
        let tensors = candle_core::safetensors::load(weights, &Device::Cpu)
            .map_err(|e| file_error(format!("cannot read adapter: {e}")))?;
        let mut halves: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (name, tensor) in tensors {
            let module = name
                .strip_prefix("base_model.model.")
                .map(|m| m.strip_prefix("model.").unwrap_or(m));
            let parsed = module.and_then(|m| {
                m.strip_suffix(".lora_A.weight")
                    .map(|m| (m, true))
                    .or_else(|| m.strip_suffix(".lora_B.weight").map(|m| (m, false)))
            });
            let Some((module, is_a)) = parsed.filter(|(m, _)| known(m)) else {
                return Err(file_error(format!(
                    "tensor `{name}` is not a LoRA update of a projection this model has"
                )));
            };
            let tensor = tensor
                .to_dtype(DType::F32)
                .map_err(|e| file_error(e.to_string()))?;
            let entry = halves.entry(module.to_string()).or_default();
            match is_a {
                true => entry.0 = Some(tensor),
                false => entry.1 = Some(tensor),
            }
        }
        let mut modules = HashMap::new();
        for (module, pair) in halves {
            let (Some(a), Some(b)) = pair else {
                return Err(file_error(format!("`{module}` lacks lora_A or lora_B")));
            };
            modules.insert(module, (a, b));
        }
        Ok(Self { modules, scaling })
    }
}

/// The served tasks' adapters, in the model's task order (one adapter may serve several tasks).
pub struct PeftAdapters {
    tasks: Vec<std::sync::Arc<PeftAdapter>>,
    /// What errors name.
    dir: PathBuf,
}

impl PeftAdapters {
    pub fn new(tasks: Vec<std::sync::Arc<PeftAdapter>>, dir: PathBuf) -> Self {
        Self { tasks, dir }
    }

    /// The stacked update of a product whose output is `parts` (module path, out features)
    /// side by side, reading `in_features`; `None` where no task targets any of them. Held in
    /// `dtype` on `device`, as the product's weight is.
    pub fn linear(
        &self,
        parts: &[(&str, usize)],
        in_features: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<LinearLora>> {
        let shape_error = |module: &str, reason: String| RuntimeError::ModelFile {
            path: self.dir.clone(),
            reason: format!("adapter for `{module}`: {reason}"),
        };
        // Each task's rank over the parts, and the widest.
        let mut ranks = Vec::with_capacity(self.tasks.len());
        for task in &self.tasks {
            let mut rank = 0;
            for (module, out) in parts {
                if let Some((a, b)) = task.modules.get(*module) {
                    let (r, k) = a.dims2().map_err(|e| shape_error(module, e.to_string()))?;
                    let (n, r_b) = b.dims2().map_err(|e| shape_error(module, e.to_string()))?;
                    if k != in_features || n != *out || r_b != r {
                        return Err(shape_error(
                            module,
                            format!("A {r}x{k} and B {n}x{r_b} do not fit a {in_features} -> {out} projection"),
                        ));
                    }
                    rank += r;
                }
            }
            ranks.push(rank);
        }
        let width = ranks.iter().copied().max().unwrap_or(0);
        if width == 0 {
            return Ok(None);
        }
        let out_total: usize = parts.iter().map(|(_, n)| n).sum();
        let tasks = self.tasks.len();
        let mut a = vec![0f32; tasks * width * in_features];
        let mut b_t = vec![0f32; tasks * width * out_total];
        let host = |t: &Tensor, module: &str| -> Result<Vec<Vec<f32>>> {
            t.to_vec2::<f32>()
                .map_err(|e| shape_error(module, e.to_string()))
        };
        for (t, task) in self.tasks.iter().enumerate() {
            let (mut row, mut column) = (0, 0);
            for (module, out) in parts {
                if let Some((a_m, b_m)) = task.modules.get(*module) {
                    let (a_m, b_m) = (host(a_m, module)?, host(b_m, module)?);
                    for (k, a_row) in a_m.iter().enumerate() {
                        let at = (t * width + row + k) * in_features;
                        a[at..at + in_features].copy_from_slice(a_row);
                        let at = (t * width + row + k) * out_total + column;
                        for (o, b_row) in b_m.iter().enumerate() {
                            b_t[at + o] = (b_row[k] as f64 * task.scaling) as f32;
                        }
                    }
                    row += a_m.len();
                }
                column += out;
            }
        }
        let tensor = |v: Vec<f32>, n: usize| -> candle_core::Result<Tensor> {
            Tensor::from_vec(v, (tasks, width, n), device)?.to_dtype(dtype)
        };
        let stacked = tensor(a, in_features)
            .and_then(|a| Ok((a, tensor(b_t, out_total)?)))
            .map_err(|e| shape_error(parts[0].0, e.to_string()))?;
        Ok(Some(LinearLora::from_stacked(stacked.0, stacked.1, 1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(modules: &[(&str, usize, usize, usize)], scaling: f64) -> PeftAdapter {
        let modules = modules
            .iter()
            .map(|(name, r, k, n)| {
                let a = Tensor::randn(0f32, 1.0, (*r, *k), &Device::Cpu).unwrap();
                let b = Tensor::randn(0f32, 1.0, (*n, *r), &Device::Cpu).unwrap();
                (name.to_string(), (a, b))
            })
            .collect();
        PeftAdapter { modules, scaling }
    }

    /// Two tasks of different rank over a `[q | v]` product, one targeting only `q`: each row's
    /// update is its task's `scaling · B · A` per part, zero where the task has no module.
    #[test]
    fn stacked_updates_equal_each_modules_merged_update() {
        let (k, nq, nv) = (6, 4, 3);
        let t0 = adapter(&[("q", 2, k, nq), ("v", 2, k, nv)], 0.5);
        let t1 = adapter(&[("q", 3, k, nq)], 2.0);
        let merged = |task: &PeftAdapter, module: &str, n: usize| -> Tensor {
            match task.modules.get(module) {
                Some((a, b)) => (b.matmul(a).unwrap() * task.scaling).unwrap(),
                None => Tensor::zeros((n, k), DType::F32, &Device::Cpu).unwrap(),
            }
        };
        let want: Vec<Tensor> = [&t0, &t1]
            .iter()
            .map(|t| Tensor::cat(&[merged(t, "q", nq), merged(t, "v", nv)], 0).unwrap())
            .collect();
        let set = PeftAdapters::new(
            vec![std::sync::Arc::new(t0), std::sync::Arc::new(t1)],
            PathBuf::from("x"),
        );
        let lora = set
            .linear(&[("q", nq), ("v", nv)], k, DType::F32, &Device::Cpu)
            .unwrap()
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, k), &Device::Cpu).unwrap();
        let zeros = Tensor::zeros((2, 1, nq + nv), DType::F32, &Device::Cpu).unwrap();
        let got = lora.add(&x, zeros, &[Some(0), Some(1)]).unwrap();
        for (row, w) in want.iter().enumerate() {
            let expect = x.get(row).unwrap().matmul(&w.t().unwrap()).unwrap();
            let diff = (got.get(row).unwrap() - expect).unwrap().abs().unwrap();
            assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-4);
        }
        let none = set
            .linear(&[("o", 5)], k, DType::F32, &Device::Cpu)
            .unwrap();
        assert!(none.is_none(), "no task targets `o`");
    }
}
