//! Reads fields out of a JSON object and records pydantic-style errors for each field that is off,
//! so one 422 names every bad field at once instead of stopping at the first.

use serde_json::{Map, Value};

use crate::encoding::EncodingSelection;
use crate::error::{LocItem, ValidationError, ValidationErrors};
use crate::input::{parse_input, InputItem};

pub(crate) struct FieldReader<'a> {
    object: Option<&'a Map<String, Value>>,
    pub(crate) errors: ValidationErrors,
}

pub(crate) fn body_loc(field: &str) -> Vec<LocItem> {
    vec!["body".into(), field.into()]
}

impl<'a> FieldReader<'a> {
    /// Fails at once when the body is not an object: no field can be read from it.
    pub(crate) fn new(body: &'a Value) -> Self {
        let mut errors = ValidationErrors::default();
        let object = body.as_object();
        if object.is_none() {
            errors.push(ValidationError::new(
                vec!["body".into()],
                "Input should be a valid dictionary or object to extract fields from",
                "model_attributes_type",
            ));
        }
        Self { object, errors }
    }

    pub(crate) fn is_object(&self) -> bool {
        self.object.is_some()
    }

    /// A present, non-null value. JSON null counts as absent, as pydantic treats `Optional` fields.
    pub(crate) fn get(&self, field: &str) -> Option<&'a Value> {
        self.object?.get(field).filter(|v| !v.is_null())
    }

    pub(crate) fn required(&mut self, field: &str) -> Option<&'a Value> {
        let value = self.get(field);
        if value.is_none() && self.object.is_some() {
            self.errors.push(ValidationError::missing(body_loc(field)));
        }
        value
    }

    pub(crate) fn required_str(&mut self, field: &str) -> Option<String> {
        let value = self.required(field)?;
        self.as_str(value, body_loc(field))
    }

    pub(crate) fn optional_bool(&mut self, field: &str) -> Option<bool> {
        let value = self.get(field)?;
        match value {
            Value::Bool(b) => Some(*b),
            _ => {
                self.errors.push(ValidationError::new(
                    body_loc(field),
                    "Input should be a valid boolean",
                    "bool_type",
                ));
                None
            }
        }
    }

    /// An integer >= `min`. Integral floats (`3.0`) pass, as pydantic's lax mode lets them.
    pub(crate) fn optional_int(&mut self, field: &str, min: i64) -> Option<i64> {
        let value = self.get(field)?;
        let loc = body_loc(field);
        let parsed = match value {
            Value::Number(n) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
            _ => None,
        };
        match parsed {
            Some(v) if v >= min => Some(v),
            Some(_) => {
                self.errors.push(ValidationError::new(
                    loc,
                    format!("Input should be greater than or equal to {min}"),
                    "greater_than_equal",
                ));
                None
            }
            None => {
                self.errors.push(ValidationError::new(
                    loc,
                    "Input should be a valid integer",
                    "int_type",
                ));
                None
            }
        }
    }

    /// A string among `allowed`, reported as pydantic reports a `Literal`.
    pub(crate) fn optional_literal(&mut self, field: &str, allowed: &[&str]) -> Option<String> {
        let value = self.get(field)?;
        let loc = body_loc(field);
        match value.as_str() {
            Some(s) if allowed.contains(&s) => Some(s.to_string()),
            _ => {
                self.errors.push(literal_error(loc, allowed));
                None
            }
        }
    }

    /// The output format, from whichever of the three field names the body uses.
    pub(crate) fn encoding(&mut self) -> Option<EncodingSelection> {
        match EncodingSelection::from_body(self.object?) {
            Ok(selection) => Some(selection),
            Err(e) => {
                self.errors.detail.extend(e.detail);
                None
            }
        }
    }

    /// `input` in any of its client forms.
    pub(crate) fn input(&mut self) -> Option<Vec<InputItem>> {
        let value = self.required("input")?;
        match parse_input(value, &body_loc("input")) {
            Ok(items) => Some(items),
            Err(e) => {
                self.errors.detail.extend(e.detail);
                None
            }
        }
    }

    fn as_str(&mut self, value: &Value, loc: Vec<LocItem>) -> Option<String> {
        match value.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                self.errors.push(ValidationError::new(
                    loc,
                    "Input should be a valid string",
                    "string_type",
                ));
                None
            }
        }
    }
}

/// pydantic's message for a value outside a `Literal[...]`: "Input should be 'a', 'b' or 'c'".
pub(crate) fn literal_error(loc: Vec<LocItem>, allowed: &[&str]) -> ValidationError {
    let quoted: Vec<String> = allowed.iter().map(|a| format!("'{a}'")).collect();
    let msg = match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            format!("Input should be {} or {}", rest.join(", "), last)
        }
        Some((last, _)) => format!("Input should be {last}"),
        None => "Input should be one of the allowed values".to_string(),
    };
    ValidationError::new(loc, msg, "literal_error")
}
