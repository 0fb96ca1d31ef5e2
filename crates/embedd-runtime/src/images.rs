//! Image inputs: decoding with a pixel budget checked before any pixel is decoded, and the
//! model's own preprocessing (`preprocessor_config.json`) as transformers' image processors do
//! it: RGB, shortest side to `size` with PIL's bicubic filter, center crop, rescale, normalize.

use std::io::Cursor;
use std::path::Path;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{ImageReader, RgbImage};
use serde_json::Value;

use crate::error::{Result, RuntimeError};
use crate::model_dir::read_json;

/// Why an image input cannot be embedded; the server answers each with a 422 naming the input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImageError {
    #[error("the image is not in a supported format (JPEG, PNG, WebP, GIF, BMP)")]
    UnsupportedFormat,
    #[error("the image has {width} x {height} pixels, more than the limit of {limit}")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("the image cannot be decoded: {0}")]
    Undecodable(String),
}

/// Decodes JPEG, PNG, WebP, GIF (first frame) or BMP bytes to RGB (alpha dropped, grey
/// replicated, as PIL's `convert("RGB")`), refusing images over `max_pixels` from their header.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Undecodable(e.to_string()))
    };
    let probe = reader()?;
    if probe.format().is_none() {
        return Err(ImageError::UnsupportedFormat);
    }
    let (width, height) = probe
        .into_dimensions()
        .map_err(|e| ImageError::Undecodable(e.to_string()))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }
    let mut reader = reader()?;
    let mut limits = image::Limits::default();
    // Room for the decoded frame in 16-bit RGBA, the widest a supported format yields.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| ImageError::Undecodable(e.to_string()))?;
    Ok(decoded.to_rgb8())
}

/// A per-channel setting (mean, std) given as three numbers.
fn three_numbers(key: &str, values: &[Value]) -> std::result::Result<[f32; 3], (String, String)> {
    let values: Vec<f32> = values
        .iter()
        .filter_map(Value::as_f64)
        .map(|x| x as f32)
        .collect();
    <[f32; 3]>::try_from(values.as_slice())
        .map_err(|_| (key.to_string(), "expected three numbers".to_string()))
}

/// A model's image preprocessing, from `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// The shortest side after resizing; `None`: no resize.
    pub shortest_edge: Option<u32>,
    /// The center crop `(height, width)`; `None`: no crop.
    pub crop: Option<(u32, u32)>,
    pub rescale: Option<f32>,
    /// Per-channel mean and std; `None`: no normalization.
    pub normalize: Option<([f32; 3], [f32; 3])>,
    /// How the center crop's offset rounds.
    pub crop_rounding: CropRounding,
}

/// Where a center crop starts when the margin is odd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CropRounding {
    /// transformers' `center_crop`: half the margin, rounded down.
    #[default]
    Floor,
    /// torchvision's `CenterCrop`: `round(margin / 2)`, halves to even (Python's `round`).
    HalfEven,
}

impl CropRounding {
    /// The crop's first row (or column) for `margin` = image side - crop side; negative where
    /// the image is smaller and padded around.
    fn offset(self, margin: i64) -> i64 {
        match self {
            CropRounding::Floor => margin.div_euclid(2),
            // torchvision pads a smaller image by floor(-margin / 2) before.
            CropRounding::HalfEven if margin < 0 => -((-margin) / 2),
            CropRounding::HalfEven => {
                let half = margin / 2;
                if margin % 2 == 1 && half % 2 == 1 {
                    half + 1
                } else {
                    half
                }
            }
        }
    }
}

impl ImageProcessor {
    /// CLIP's defaults at `side` pixels, for models without a preprocessor config.
    pub fn clip(side: u32) -> Self {
        Self {
            shortest_edge: Some(side),
            crop: Some((side, side)),
            rescale: Some(1.0 / 255.0),
            normalize: Some((
                [0.481_454_66, 0.457_827_5, 0.408_210_73],
                [0.268_629_54, 0.261_302_6, 0.275_777_1],
            )),
            crop_rounding: CropRounding::Floor,
        }
    }

    pub fn from_file(path: &Path, side: u32) -> Result<Self> {
        let config = read_json(path)?;
        Self::from_config(&config, side).map_err(|(field, reason)| RuntimeError::ModelConfig {
            path: path.to_path_buf(),
            field,
            reason,
        })
    }

    /// Reads transformers' `CLIPImageProcessor` fields; `side` is the tower's input size, the
    /// default for absent sizes.
    pub fn from_config(config: &Value, side: u32) -> std::result::Result<Self, (String, String)> {
        if config.get("image_processor_type").and_then(Value::as_str)
            == Some("JinaCLIPImageProcessor")
        {
            return Self::from_jina_config(config, side);
        }
        let defaults = Self::clip(side);
        let flag = |k: &str| config.get(k).and_then(Value::as_bool).unwrap_or(true);
        let size_of = |v: &Value, key: &str| -> Option<u32> {
            v.as_u64()
                .or_else(|| v.get(key).and_then(Value::as_u64))
                .map(|n| n as u32)
        };
        if let Some(resample) = config.get("resample").and_then(Value::as_u64) {
            // PIL's numbering: 3 is BICUBIC.
            if resample != 3 {
                return Err((
                    "resample".into(),
                    format!("resampling filter {resample} is not supported (3, bicubic)"),
                ));
            }
        }
        let shortest_edge = match config.get("size") {
            _ if !flag("do_resize") => None,
            None => defaults.shortest_edge,
            Some(size) => Some(size_of(size, "shortest_edge").ok_or_else(|| {
                (
                    "size".to_string(),
                    "expected a number or {\"shortest_edge\": N}".to_string(),
                )
            })?),
        };
        let crop = match config.get("crop_size") {
            _ if !flag("do_center_crop") => None,
            None => defaults.crop,
            Some(c) => match (c.as_u64(), c.get("height"), c.get("width")) {
                (Some(n), _, _) => Some((n as u32, n as u32)),
                (None, Some(h), Some(w)) => Some((
                    h.as_u64().unwrap_or_default() as u32,
                    w.as_u64().unwrap_or_default() as u32,
                )),
                _ => {
                    return Err((
                        "crop_size".into(),
                        "expected a number or {\"height\", \"width\"}".into(),
                    ))
                }
            },
        };
        let rescale = flag("do_rescale").then(|| {
            config
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .map_or(1.0 / 255.0, |f| f as f32)
        });
        let triple = |k: &str, default: [f32; 3]| match config.get(k) {
            None => Ok(default),
            Some(v) => three_numbers(k, v.as_array().map_or(&[][..], Vec::as_slice)),
        };
        let (mean, std) = defaults.normalize.unwrap_or_default();
        let normalize = if flag("do_normalize") {
            Some((triple("image_mean", mean)?, triple("image_std", std)?))
        } else {
            None
        };
        Ok(Self {
            shortest_edge,
            crop,
            rescale,
            normalize,
            crop_rounding: CropRounding::Floor,
        })
    }

    /// jina-clip's `JinaCLIPImageProcessor` (its `transform.py`, evaluation branch): torchvision's
    /// Resize of the short side to `size` (bicubic, on the PIL image), CenterCrop, ToTensor,
    /// Normalize with `mean`/`std` (CLIP's when null).
    fn from_jina_config(config: &Value, side: u32) -> std::result::Result<Self, (String, String)> {
        let defaults = Self::clip(side);
        let refuse = |field: &str, reason: &str| Err((field.to_string(), reason.to_string()));
        match config.get("resize_mode").and_then(Value::as_str) {
            None | Some("shortest") => {}
            Some(_) => return refuse("resize_mode", "only 'shortest' is supported"),
        }
        match config.get("interpolation").and_then(Value::as_str) {
            None | Some("bicubic") => {}
            Some(_) => return refuse("interpolation", "only 'bicubic' is supported"),
        }
        let size = match config.get("size") {
            None | Some(Value::Null) => side,
            Some(v) => {
                let sides: Vec<u64> = match v {
                    Value::Array(a) => a.iter().filter_map(Value::as_u64).collect(),
                    other => other.as_u64().into_iter().collect(),
                };
                match sides.as_slice() {
                    [n] => *n as u32,
                    [h, w] if h == w => *h as u32,
                    _ => return refuse("size", "expected one side (a square input)"),
                }
            }
        };
        let triple = |k: &str, default: [f32; 3]| match config.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Array(a)) => three_numbers(k, a),
            Some(v) => v
                .as_f64()
                .map(|x| [x as f32; 3])
                .ok_or_else(|| (k.to_string(), "expected a number or three".to_string())),
        };
        let (mean, std) = defaults.normalize.unwrap_or_default();
        Ok(Self {
            shortest_edge: Some(size),
            crop: Some((size, size)),
            rescale: Some(1.0 / 255.0),
            normalize: Some((triple("mean", mean)?, triple("std", std)?)),
            crop_rounding: CropRounding::HalfEven,
        })
    }

    /// The output's `(height, width)` for an input of any size.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        match (self.crop, self.shortest_edge) {
            (Some(crop), _) => crop,
            (None, Some(_)) => {
                let (w, h) = self.resized_size(width, height);
                (h, w)
            }
            (None, None) => (height, width),
        }
    }

    /// transformers' `get_resize_output_image_size` with `default_to_square=False`: the short
    /// side becomes `shortest_edge`, the long side scales with it, rounded down.
    fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        let Some(edge) = self.shortest_edge else {
            return (width, height);
        };
        let (short, long) = (width.min(height).max(1), width.max(height));
        let scaled = ((u64::from(edge) * u64::from(long)) / u64::from(short)) as u32;
        if width <= height {
            (edge, scaled)
        } else {
            (scaled, edge)
        }
    }

    /// Channel-first `[3, height, width]` float32 pixels, ready for the tower.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Vec<f32>, ImageError> {
        let resized = self.resize(image)?;
        let (width, height) = resized.dimensions();
        let (out_h, out_w) = self.crop.unwrap_or((height, width));
        // A side smaller than the crop is padded with zeros around the image.
        let top = self
            .crop_rounding
            .offset(i64::from(height) - i64::from(out_h));
        let left = self
            .crop_rounding
            .offset(i64::from(width) - i64::from(out_w));
        let scale = self.rescale.unwrap_or(1.0);
        let (mean, std) = self.normalize.unwrap_or(([0.0; 3], [1.0; 3]));
        let plane = (out_h * out_w) as usize;
        let mut out = vec![0f32; 3 * plane];
        for y in 0..out_h {
            let sy = i64::from(y) + top;
            for x in 0..out_w {
                let sx = i64::from(x) + left;
                let inside =
                    (0..i64::from(height)).contains(&sy) && (0..i64::from(width)).contains(&sx);
                let pixel = if inside {
                    resized.get_pixel(sx as u32, sy as u32).0
                } else {
                    [0, 0, 0]
                };
                let at = (y * out_w + x) as usize;
                for c in 0..3 {
                    let v = f32::from(pixel[c]) * scale;
                    out[c * plane + at] = (v - mean[c]) / std[c];
                }
            }
        }
        Ok(out)
    }

    /// PIL's bicubic resize (the convolution filter with a = -0.5, which fast_image_resize
    /// implements as Pillow does).
    fn resize(&self, image: &RgbImage) -> Result<RgbImage, ImageError> {
        let (width, height) = image.dimensions();
        let (w, h) = self.resized_size(width, height);
        if (w, h) == (width, height) {
            return Ok(image.clone());
        }
        let fail = |e: &dyn std::fmt::Display| ImageError::Undecodable(format!("resizing: {e}"));
        let source = Image::from_vec_u8(width, height, image.as_raw().clone(), PixelType::U8x3)
            .map_err(|e| fail(&e))?;
        let mut target = Image::new(w.max(1), h.max(1), PixelType::U8x3);
        let options =
            ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
        Resizer::new()
            .resize(&source, &mut target, &options)
            .map_err(|e| fail(&e))?;
        RgbImage::from_raw(w.max(1), h.max(1), target.into_vec())
            .ok_or_else(|| ImageError::Undecodable("resizing: buffer size".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, 128])
        });
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        bytes
    }

    #[test]
    fn decoding_checks_the_pixel_budget_first_and_names_bad_bytes() {
        let bytes = png(40, 30);
        assert_eq!(decode(&bytes, 1200).unwrap().dimensions(), (40, 30));
        assert_eq!(
            decode(&bytes, 1199).unwrap_err(),
            ImageError::TooManyPixels {
                width: 40,
                height: 30,
                limit: 1199
            }
        );
        assert_eq!(
            decode(b"definitely not an image", 1000).unwrap_err(),
            ImageError::UnsupportedFormat
        );
        let truncated = &bytes[..bytes.len() / 2];
        assert!(matches!(
            decode(truncated, 1200),
            Err(ImageError::Undecodable(_))
        ));
    }

    #[test]
    fn the_short_side_is_resized_then_the_center_cropped() {
        let p = ImageProcessor::clip(16);
        assert_eq!(p.resized_size(40, 30), (21, 16));
        assert_eq!(p.resized_size(30, 45), (16, 24));
        let pixels = p
            .preprocess(&decode(&png(40, 30), u64::MAX).unwrap())
            .unwrap();
        assert_eq!(pixels.len(), 3 * 16 * 16);
        // Blue is constant at 128, so every blue value is the normalized 128.
        let blue = (128.0 / 255.0 - 0.408_210_73) / 0.275_777_1;
        assert!(pixels[2 * 256..].iter().all(|v| (v - blue).abs() < 1e-5));
    }

    #[test]
    fn the_config_reads_both_size_forms() {
        let config = serde_json::json!({
            "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3
        });
        let p = ImageProcessor::from_config(&config, 224).unwrap();
        assert_eq!(p.shortest_edge, Some(224));
        assert_eq!(p.crop, Some((224, 224)));
        assert_eq!(p.normalize, Some(([0.5; 3], [0.5; 3])));
        let p = ImageProcessor::from_config(&serde_json::json!({"size": 32, "crop_size": 32}), 224)
            .unwrap();
        assert_eq!((p.shortest_edge, p.crop), (Some(32), Some((32, 32))));
        let err =
            ImageProcessor::from_config(&serde_json::json!({"resample": 2}), 224).unwrap_err();
        assert_eq!(err.0, "resample");
    }

    #[test]
    fn torchvision_crops_round_half_to_even() {
        let half_even = CropRounding::HalfEven;
        // round(153.5) = 154, round(18.5) = 18, as Python rounds; transformers floors both.
        assert_eq!(half_even.offset(307), 154);
        assert_eq!(half_even.offset(37), 18);
        assert_eq!(CropRounding::Floor.offset(307), 153);
        assert_eq!(half_even.offset(56), 28);
        // A smaller image is padded by floor(-margin / 2) before it.
        assert_eq!(half_even.offset(-3), -1);
        assert_eq!(CropRounding::Floor.offset(-3), -2);
    }

    #[test]
    fn jina_clip_processor_config_is_read() {
        let config = serde_json::json!({
            "image_processor_type": "JinaCLIPImageProcessor", "size": 512, "mean": null,
            "std": null, "resize_mode": "shortest", "interpolation": "bicubic", "fill_color": 0,
        });
        let p = ImageProcessor::from_config(&config, 224).unwrap();
        assert_eq!((p.shortest_edge, p.crop), (Some(512), Some((512, 512))));
        assert_eq!(p.crop_rounding, CropRounding::HalfEven);
        assert_eq!(p.normalize, ImageProcessor::clip(512).normalize);
        let mut longest = config.clone();
        longest["resize_mode"] = "longest".into();
        assert_eq!(
            ImageProcessor::from_config(&longest, 224).unwrap_err().0,
            "resize_mode"
        );
    }
}
