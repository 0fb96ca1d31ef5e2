//! Output encodings of a vector: float, base64 (little-endian f32), binary / ubinary (packed sign bits).

use std::collections::BTreeMap;

use base64::Engine;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::{LocItem, ValidationError, ValidationErrors};
use crate::reader::{body_loc, literal_error};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
    Binary,
    Ubinary,
}

impl EncodingFormat {
    pub const NAMES: [&'static str; 4] = ["float", "base64", "binary", "ubinary"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "float" => Self::Float,
            "base64" => Self::Base64,
            "binary" => Self::Binary,
            "ubinary" => Self::Ubinary,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Float => "float",
            Self::Base64 => "base64",
            Self::Binary => "binary",
            Self::Ubinary => "ubinary",
        }
    }

    pub fn encode(self, vector: &[f32]) -> EncodedVector {
        match self {
            Self::Float => EncodedVector::Float(vector.to_vec()),
            Self::Base64 => EncodedVector::Base64(base64_f32_le(vector)),
            Self::Binary => EncodedVector::Binary(
                pack_sign_bits(vector)
                    .into_iter()
                    // sentence-transformers' int8 form: the packed byte shifted by -128.
                    .map(|b| (b as i16 - 128) as i8)
                    .collect(),
            ),
            Self::Ubinary => EncodedVector::Ubinary(pack_sign_bits(vector)),
        }
    }
}

/// What the client asked for: one format (the `embedding` is that encoding) or a list (the `embedding`
/// is an object keyed by format name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EncodingSelection {
    Single(EncodingFormat),
    Several(Vec<EncodingFormat>),
}

impl Default for EncodingSelection {
    fn default() -> Self {
        Self::Single(EncodingFormat::Float)
    }
}

/// The names clients use for the output format, in the order they are read: Jina's own name first,
/// then LlamaIndex's, then OpenAI's. The first one present wins.
pub const ENCODING_FIELDS: [&str; 3] = ["embedding_type", "encoding_type", "encoding_format"];

impl EncodingSelection {
    /// Reads the selection from whichever of [`ENCODING_FIELDS`] the body carries.
    pub fn from_body(body: &serde_json::Map<String, Value>) -> Result<Self, ValidationErrors> {
        for field in ENCODING_FIELDS {
            if let Some(value) = body.get(field).filter(|v| !v.is_null()) {
                return Self::parse(value, &body_loc(field)).map_err(ValidationErrors::single);
            }
        }
        Ok(Self::default())
    }

    fn parse(value: &Value, loc: &[LocItem]) -> Result<Self, ValidationError> {
        let one = |v: &Value, loc: Vec<LocItem>| {
            v.as_str()
                .and_then(EncodingFormat::parse)
                .ok_or_else(|| literal_error(loc, &EncodingFormat::NAMES))
        };
        match value {
            Value::Array(items) if items.is_empty() => Err(ValidationError::new(
                loc.to_vec(),
                "List should have at least 1 item after validation, not 0",
                "too_short",
            )),
            Value::Array(items) => {
                let mut formats = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let mut item_loc = loc.to_vec();
                    item_loc.push(i.into());
                    let format = one(item, item_loc)?;
                    if !formats.contains(&format) {
                        formats.push(format);
                    }
                }
                Ok(Self::Several(formats))
            }
            v => one(v, loc.to_vec()).map(Self::Single),
        }
    }

    pub fn encode(&self, vector: &[f32]) -> EncodedEmbedding {
        match self {
            Self::Single(format) => EncodedEmbedding::One(format.encode(vector)),
            Self::Several(formats) => EncodedEmbedding::Keyed(
                formats
                    .iter()
                    .map(|f| (f.as_str(), f.encode(vector)))
                    .collect(),
            ),
        }
    }
}

/// A vector in one encoding, serialized as the bare value clients expect.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EncodedVector {
    Float(Vec<f32>),
    Base64(String),
    Binary(Vec<i8>),
    Ubinary(Vec<u8>),
}

/// The `embedding` field: one encoding, or several keyed by name.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EncodedEmbedding {
    One(EncodedVector),
    Keyed(BTreeMap<&'static str, EncodedVector>),
}

fn base64_f32_le(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One bit per dimension (set where the value is > 0), most significant bit first, zero-padded to a
/// whole byte: numpy's `packbits(v > 0)`.
fn pack_sign_bits(vector: &[f32]) -> Vec<u8> {
    vector
        .chunks(8)
        .map(|chunk| {
            chunk.iter().enumerate().fold(
                0u8,
                |byte, (i, &v)| if v > 0.0 { byte | (0x80 >> i) } else { byte },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_is_little_endian_f32() {
        let EncodedVector::Base64(s) = EncodingFormat::Base64.encode(&[1.0, -2.5]) else {
            panic!("wrong variant")
        };
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(bytes.len(), 8);
        assert_eq!(f32::from_le_bytes(bytes[0..4].try_into().unwrap()), 1.0);
        assert_eq!(f32::from_le_bytes(bytes[4..8].try_into().unwrap()), -2.5);
    }

    #[test]
    fn sign_bits_pack_msb_first_with_padding() {
        // 10 dims: bits 1,0,1,1,0,0,0,1 | 1,0 -> 0b1011_0001, 0b1000_0000
        let v = [0.5, -1.0, 2.0, 0.1, 0.0, -0.2, -3.0, 9.0, 1.0, -1.0];
        assert_eq!(
            EncodingFormat::Ubinary.encode(&v),
            EncodedVector::Ubinary(vec![0b1011_0001, 0b1000_0000])
        );
        assert_eq!(
            EncodingFormat::Binary.encode(&v),
            EncodedVector::Binary(vec![(0b1011_0001u8 as i16 - 128) as i8, 0])
        );
    }

    #[test]
    fn selection_reads_all_three_names_in_order() {
        let body = json!({"encoding_format": "base64"});
        assert_eq!(
            EncodingSelection::from_body(body.as_object().unwrap()).unwrap(),
            EncodingSelection::Single(EncodingFormat::Base64)
        );
        let body = json!({"embedding_type": ["float", "ubinary"], "encoding_format": "base64"});
        assert_eq!(
            EncodingSelection::from_body(body.as_object().unwrap()).unwrap(),
            EncodingSelection::Several(vec![EncodingFormat::Float, EncodingFormat::Ubinary])
        );
        let body = json!({"encoding_type": "binary"});
        assert_eq!(
            EncodingSelection::from_body(body.as_object().unwrap()).unwrap(),
            EncodingSelection::Single(EncodingFormat::Binary)
        );
        let body = json!({});
        assert_eq!(
            EncodingSelection::from_body(body.as_object().unwrap()).unwrap(),
            EncodingSelection::default()
        );
    }

    #[test]
    fn unknown_format_is_a_literal_error_naming_the_field() {
        let body = json!({"encoding_type": ["float", "int4"]});
        let err = EncodingSelection::from_body(body.as_object().unwrap()).unwrap_err();
        assert_eq!(err.detail[0].kind, "literal_error");
        assert_eq!(
            err.detail[0].loc,
            vec!["body".into(), "encoding_type".into(), 1.into()]
        );
        assert_eq!(
            err.detail[0].msg,
            "Input should be 'float', 'base64', 'binary' or 'ubinary'"
        );
    }

    #[test]
    fn several_formats_serialize_as_keyed_object() {
        let sel = EncodingSelection::Several(vec![EncodingFormat::Float, EncodingFormat::Ubinary]);
        let json = serde_json::to_value(sel.encode(&[1.0, -1.0])).unwrap();
        assert_eq!(json, json!({"float": [1.0, -1.0], "ubinary": [128]}));
    }
}
