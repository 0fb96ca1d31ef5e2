//! Error bodies as FastAPI writes them: `{"detail":[{loc,msg,type}]}` for validation, `{"detail":"..."}` otherwise.

use serde::Serialize;
use utoipa::ToSchema;

/// One step of a validation error location: a field name or a list index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum LocItem {
    Field(String),
    Index(usize),
}

impl From<&str> for LocItem {
    fn from(s: &str) -> Self {
        LocItem::Field(s.to_string())
    }
}

impl From<usize> for LocItem {
    fn from(i: usize) -> Self {
        LocItem::Index(i)
    }
}

/// One entry of a FastAPI 422 body.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ValidationError {
    pub loc: Vec<LocItem>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
}

impl ValidationError {
    pub fn new(loc: Vec<LocItem>, msg: impl Into<String>, kind: impl Into<String>) -> Self {
        Self {
            loc,
            msg: msg.into(),
            kind: kind.into(),
        }
    }

    /// A pydantic-style `value_error`: the message is prefixed as pydantic does.
    pub fn value(loc: Vec<LocItem>, msg: impl AsRef<str>) -> Self {
        Self::new(loc, format!("Value error, {}", msg.as_ref()), "value_error")
    }

    pub fn missing(loc: Vec<LocItem>) -> Self {
        Self::new(loc, "Field required", "missing")
    }
}

/// The whole 422 body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema, thiserror::Error)]
#[error("request validation failed: {}", summary(.detail))]
pub struct ValidationErrors {
    pub detail: Vec<ValidationError>,
}

fn summary(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(|e| {
            let loc: Vec<String> = e
                .loc
                .iter()
                .map(|l| match l {
                    LocItem::Field(s) => s.clone(),
                    LocItem::Index(i) => i.to_string(),
                })
                .collect();
            format!("{}: {}", loc.join("."), e.msg)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl ValidationErrors {
    pub fn single(error: ValidationError) -> Self {
        Self {
            detail: vec![error],
        }
    }

    pub fn push(&mut self, error: ValidationError) {
        self.detail.push(error);
    }

    pub fn is_empty(&self) -> bool {
        self.detail.is_empty()
    }

    /// The body of a request that is not JSON at all, located as FastAPI does (`["body", byte offset]`).
    pub fn json_invalid(offset: usize, reason: &str) -> Self {
        Self::single(ValidationError::new(
            vec!["body".into(), offset.into()],
            format!("JSON decode error: {reason}"),
            "json_invalid",
        ))
    }

    /// `Ok(value)` when nothing was recorded, the errors otherwise.
    pub fn into_result<T>(self, value: T) -> Result<T, Self> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

/// Every non-validation error: `{"detail": "message"}`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ErrorBody {
    pub detail: String,
}

impl ErrorBody {
    pub fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
        }
    }
}
