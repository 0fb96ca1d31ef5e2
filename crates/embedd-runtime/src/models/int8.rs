//! `--dtype int8` layers and their calibration: which input channels each layer keeps in
//! float32 is measured at load, by running the model in float32 over a few built-in texts.
//!
//! A handful of channels in a Transformer's activations (after each LayerNorm above all) run
//! 10-50x larger than the rest, the same channels for every input. Quantized with the row they
//! set the row's scale, and every other channel loses most of its resolution; taken out and
//! multiplied in float32 (eight per layer, under 2% of the products) they cost nothing in
//! accuracy. They show in any text, so a small fixed set finds them: on all-MiniLM-L6-v2
//! channels found from 64 synthetic English sentences did as well on the parity fixture as
//! channels found from the fixture itself (0.9986 and 0.9987 lowest cosine, per-column
//! weights).

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rayon::prelude::*;

use crate::kernels::{self, PackedI8};

/// Input channels per layer multiplied in float32.
const OUTLIER_CHANNELS: usize = 8;

/// What the float32 pass over these tells each layer: several languages and scripts, code,
/// numbers, markup and the shortest inputs (one token of text), where a mean over few tokens
/// shows every error.
pub const CALIBRATION_TEXTS: &[&str] = &[
    "OK",
    "?",
    "Thanks!",
    "What is the capital of France?",
    "How do I reset my password if I no longer have access to my email?",
    "The quarterly report shows revenue grew 12% to $4.3 billion, driven by cloud services.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules, \
     releasing oxygen as a by-product of splitting water.",
    "A search engine returns ranked documents for each query, while the embedding model maps \
     text into vectors that compare by cosine similarity across large collections.",
    "In 1969 the Apollo 11 mission landed the first humans on the Moon; Neil Armstrong and Buzz \
     Aldrin spent about two and a quarter hours outside the lunar module.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "SELECT name, COUNT(*) FROM orders WHERE created_at > '2024-01-01' GROUP BY name;",
    "<div class=\"card\"><h2>Title</h2><p>Some <b>bold</b> text &amp; a link.</p></div>",
    "{\"id\": 42, \"tags\": [\"alpha\", \"beta\"], \"score\": 0.875, \"active\": true}",
    "Der schnelle braune Fuchs springt über den faulen Hund, und niemand weiß warum.",
    "Le gouvernement a annoncé de nouvelles mesures pour soutenir les petites entreprises.",
    "El museo abre todos los días de nueve a seis, excepto los lunes y festivos.",
    "Москва — столица России и крупнейший город страны по численности населения.",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
    "机器学习模型需要大量的数据来进行训练和评估。",
    "ERROR 2024-05-17T08:13:22Z worker-3 timeout after 30000 ms (retry 2/5) id=9f3ac1",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987",
    "Patient presents with acute chest pain radiating to the left arm; ECG shows ST elevation.",
    "Terms and conditions: the licensee shall not sublicense, sell, or otherwise transfer the \
     software without prior written consent of the licensor, except as expressly permitted.",
    "lol that was sooo good 😂😂 cant wait for the next one!!!",
];

thread_local! {
    /// The layers built while a [`Int8Calibration::collect`] runs on this thread.
    static COLLECTING: RefCell<Option<Vec<Int8Layer>>> = const { RefCell::new(None) };
}

/// A dense layer's weight for the int8 kernel: float32 while its model is being calibrated,
/// then quantized and packed for good.
#[derive(Clone)]
pub struct Int8Layer(Arc<LayerState>);

struct LayerState {
    n: usize,
    packed: OnceLock<PackedI8>,
    calibrating: Mutex<Option<Calibrating>>,
}

struct Calibrating {
    /// `k x n`, row-major.
    weight: Vec<f32>,
    k: usize,
    /// Per input channel: the largest magnitude seen.
    input_max: Vec<f32>,
}

impl Int8Layer {
    /// The layer for `w` (`k x n`, row-major): kept in float32 for the calibration collecting
    /// on this thread, if one is, else quantized now without outlier channels.
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        let state = LayerState {
            n,
            packed: OnceLock::new(),
            calibrating: Mutex::new(None),
        };
        let layer = Self(Arc::new(state));
        let collected = COLLECTING.with(|c| match c.borrow_mut().as_mut() {
            Some(layers) => {
                layers.push(layer.clone());
                true
            }
            None => false,
        });
        if collected {
            *layer.lock() = Some(Calibrating {
                weight: w.to_vec(),
                k,
                input_max: vec![0.0; k],
            });
        } else {
            // A fresh lock: nothing else holds it.
            let _ = layer.0.packed.set(PackedI8::pack(w, k, n, &[]));
        }
        layer
    }

    pub fn n(&self) -> usize {
        self.0.n
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Calibrating>> {
        self.0
            .calibrating
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `x · w` for `x` of `rows x k`: the int8 product, or while calibrating the float32 one,
    /// noting each input channel's largest magnitude.
    pub fn matmul(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        if let Some(packed) = self.0.packed.get() {
            return Ok(packed.matmul(x, rows));
        }
        let mut calibrating = self.lock();
        match calibrating.as_mut() {
            Some(c) => {
                for row in x.chunks_exact(c.k) {
                    for (max, v) in c.input_max.iter_mut().zip(row) {
                        *max = max.max(v.abs());
                    }
                }
                Ok(kernels::matmul(x, rows, c.k, &c.weight, self.0.n))
            }
            // `finish` packs before it lets go of the lock.
            None => match self.0.packed.get() {
                Some(packed) => Ok(packed.matmul(x, rows)),
                None => candle_core::bail!("an int8 layer was neither calibrating nor packed"),
            },
        }
    }

    /// Quantizes the layer with the channels calibration found, if it is still calibrating.
    fn finish(&self) {
        let mut calibrating = self.lock();
        if let Some(c) = calibrating.take() {
            let outliers = outlier_channels(&c.input_max);
            let _ = self
                .0
                .packed
                .set(PackedI8::pack(&c.weight, c.k, self.0.n, &outliers));
        }
    }
}

/// The channels with the largest magnitudes seen, up to [`OUTLIER_CHANNELS`] and one in 16;
/// none that never carried a value.
fn outlier_channels(input_max: &[f32]) -> Vec<usize> {
    let mut channels: Vec<usize> = (0..input_max.len())
        .filter(|&c| input_max[c] > 0.0)
        .collect();
    channels.sort_by(|&a, &b| input_max[b].total_cmp(&input_max[a]));
    channels.truncate(OUTLIER_CHANNELS.min(input_max.len() / 16));
    channels
}

/// The int8 layers a model's load built, held in float32 until [`Self::finish`] (or drop)
/// quantizes them with what the float32 passes between saw.
pub struct Int8Calibration {
    layers: Vec<Int8Layer>,
}

impl Int8Calibration {
    /// Runs `load`, collecting every int8 layer it builds on this thread.
    pub fn collect<T>(load: impl FnOnce() -> T) -> (T, Self) {
        /// Puts back what was collecting before, even if `load` panics.
        struct Restore(Option<Option<Vec<Int8Layer>>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                if let Some(previous) = self.0.take() {
                    COLLECTING.with(|c| *c.borrow_mut() = previous);
                }
            }
        }
        let mut restore = Restore(Some(COLLECTING.with(|c| c.replace(Some(Vec::new())))));
        let value = load();
        let previous = restore.0.take().unwrap_or_default();
        let layers = COLLECTING.with(|c| c.replace(previous)).unwrap_or_default();
        (value, Self { layers })
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Quantizes every layer.
    pub fn finish(self) {}
}

impl Drop for Int8Calibration {
    fn drop(&mut self) {
        self.layers.par_iter().for_each(Int8Layer::finish);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outliers_are_the_largest_channels_seen() {
        let mut seen = vec![1.0f32; 64];
        seen[3] = 40.0;
        seen[17] = 9.0;
        seen[60] = 0.0;
        assert_eq!(outlier_channels(&seen)[..2], [3, 17]);
        assert_eq!(outlier_channels(&seen).len(), 4); // one in 16 of 64
        assert!(!outlier_channels(&seen).contains(&60));
        assert!(outlier_channels(&[0.0; 256]).is_empty());
        assert_eq!(outlier_channels(&vec![1.0; 4096]).len(), OUTLIER_CHANNELS);
    }

    /// Layers built inside `collect` run in float32 and record their inputs until the
    /// calibration finishes; then they take the outlier channels it found. Outside, they are
    /// quantized at once.
    #[test]
    fn collected_layers_stay_float_until_the_calibration_finishes() {
        if !kernels::int8::available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let (k, n) = (64, 8);
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5) % 11) as f32 / 10.0 - 0.5)
            .collect();
        let mut x: Vec<f32> = (0..2 * k).map(|i| ((i * 3) % 7) as f32 / 7.0).collect();
        x[5] = 300.0; // channel 5 of the first row
        let exact = kernels::matmul(&x, 2, k, &w, n);
        let (layer, calibration) = Int8Calibration::collect(|| Int8Layer::new(&w, k, n));
        assert_eq!(calibration.layers.len(), 1);
        assert_eq!(layer.matmul(&x, 2).unwrap(), exact);
        calibration.finish();
        let calibrated = layer.matmul(&x, 2).unwrap();
        let plain = Int8Layer::new(&w, k, n).matmul(&x, 2).unwrap();
        let error = |got: &[f32]| {
            got.iter()
                .zip(&exact)
                .map(|(g, e)| (g - e).abs())
                .fold(0f32, f32::max)
        };
        // With channel 5 in float32 the first row's other channels keep their resolution.
        assert!(
            error(&calibrated) * 20.0 < error(&plain),
            "{} vs {}",
            error(&calibrated),
            error(&plain)
        );
        // Nothing is collected after `collect` returns.
        let (_, empty) = Int8Calibration::collect(|| ());
        assert!(empty.is_empty());
    }
}
