//! Reading an OpenAI batch input file: one JSON request per line, checked whole when the batch
//! is created (as OpenAI's validation step does) and planned as chunks of lines.

use std::collections::HashSet;

use embedd_api::openai_batch::{BatchLineError, BatchRequestLine};

use crate::csv_input::ChunkPlan;

/// At most this many line errors are reported for one file.
const MAX_REPORTED_ERRORS: usize = 100;

/// A checked batch input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub requests: u64,
    /// The model every line names.
    pub model: String,
    pub chunks: Vec<ChunkPlan>,
}

/// The non-blank lines of `bytes`, each with the byte offset it starts at.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut start = 0;
    bytes
        .split_inclusive(|&b| b == b'\n')
        .map(move |line| {
            let at = start;
            start += line.len();
            (at, line)
        })
        .filter(|(_, line)| !line.trim_ascii().is_empty())
}

fn line_error(line: u64, code: &str, message: String, param: Option<&str>) -> BatchLineError {
    BatchLineError {
        code: code.into(),
        message,
        param: param.map(Into::into),
        line: Some(line),
    }
}

/// Checks every line (a JSON object with a unique `custom_id`, `method` POST, `url` equal to
/// `endpoint`, a `body` naming the same `model` as every other line) and plans chunks of
/// `chunk_rows` requests; otherwise the errors, one per bad line.
pub fn check(
    bytes: &[u8],
    endpoint: &str,
    chunk_rows: u64,
) -> Result<BatchPlan, Vec<BatchLineError>> {
    let chunk_rows = chunk_rows.max(1);
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut model: Option<String> = None;
    let mut starts = Vec::new();
    let mut requests = 0u64;
    for (number, (at, raw)) in lines(bytes).enumerate() {
        let number = number as u64 + 1;
        if errors.len() >= MAX_REPORTED_ERRORS {
            break;
        }
        let parsed: BatchRequestLine = match serde_json::from_slice(raw) {
            Ok(line) => line,
            Err(e) => {
                errors.push(line_error(
                    number,
                    "invalid_json_line",
                    format!("line {number} is not a batch request: {e}"),
                    None,
                ));
                continue;
            }
        };
        if !seen.insert(parsed.custom_id.clone()) {
            errors.push(line_error(
                number,
                "duplicate_custom_id",
                format!("custom_id '{}' appears more than once", parsed.custom_id),
                Some("custom_id"),
            ));
        }
        if parsed.method != "POST" {
            errors.push(line_error(
                number,
                "invalid_method",
                format!("method must be POST, not '{}'", parsed.method),
                Some("method"),
            ));
        }
        if parsed.url != endpoint {
            errors.push(line_error(
                number,
                "mismatched_endpoint",
                format!(
                    "url '{}' differs from the batch's endpoint '{endpoint}'",
                    parsed.url
                ),
                Some("url"),
            ));
        }
        match (parsed.body.get("model").and_then(|m| m.as_str()), &model) {
            (None, _) => errors.push(line_error(
                number,
                "missing_model",
                "body.model is required".into(),
                Some("body.model"),
            )),
            (Some(m), Some(first)) if m != first => errors.push(line_error(
                number,
                "mismatched_model",
                format!("every request in a batch uses one model: '{m}' differs from '{first}'"),
                Some("body.model"),
            )),
            (Some(m), None) => model = Some(m.to_string()),
            _ => {}
        }
        if requests.is_multiple_of(chunk_rows) {
            starts.push(at as u64);
        }
        requests += 1;
    }
    if requests == 0 && errors.is_empty() {
        errors.push(BatchLineError {
            code: "empty_file".into(),
            message: "the input file has no requests".into(),
            param: None,
            line: None,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let chunks = ChunkPlan::from_starts(&starts, requests, chunk_rows, bytes.len() as u64);
    Ok(BatchPlan {
        requests,
        model: model.unwrap_or_default(),
        chunks,
    })
}

/// The requests of one planned chunk, from its bytes of the input.
pub fn chunk_requests(bytes: &[u8], plan: &ChunkPlan) -> Result<Vec<BatchRequestLine>, String> {
    let requests: Vec<BatchRequestLine> = lines(bytes)
        .map(|(_, raw)| serde_json::from_slice(raw).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    if requests.len() as u64 != plan.rows {
        return Err(format!(
            "chunk at request {} holds {} requests, {} were planned",
            plan.first_row,
            requests.len(),
            plan.rows
        ));
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/embeddings","body":{{"model":"{model}","input":"x {id}"}}}}"#
        )
    }

    #[test]
    fn lines_are_planned_in_chunks_and_read_back() {
        let file = format!(
            "{}\n\n{}\n{}\r\n",
            line("a", "m"),
            line("b", "m"),
            line("c", "m")
        );
        let plan = check(file.as_bytes(), "/v1/embeddings", 2).unwrap();
        assert_eq!((plan.requests, plan.model.as_str()), (3, "m"));
        assert_eq!(plan.chunks.len(), 2);
        let ids: Vec<String> = plan
            .chunks
            .iter()
            .flat_map(|c| {
                let slice = &file.as_bytes()[c.byte_start as usize..c.byte_end as usize];
                chunk_requests(slice, c).unwrap()
            })
            .map(|r| r.custom_id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn bad_lines_are_each_named() {
        let file = [
            line("a", "m"),
            "not json".into(),
            line("a", "m"),
            line("b", "other"),
            line("c", "m").replace("POST", "GET"),
            line("d", "m").replace("/v1/embeddings", "/v1/chat/completions"),
        ]
        .join("\n");
        let errors = check(file.as_bytes(), "/v1/embeddings", 10).unwrap_err();
        let codes: Vec<(u64, &str)> = errors
            .iter()
            .map(|e| (e.line.unwrap(), e.code.as_str()))
            .collect();
        assert_eq!(
            codes,
            [
                (2, "invalid_json_line"),
                (3, "duplicate_custom_id"),
                (4, "mismatched_model"),
                (5, "invalid_method"),
                (6, "mismatched_endpoint")
            ]
        );
        assert_eq!(
            check(b"\n \n", "/v1/embeddings", 1).unwrap_err()[0].code,
            "empty_file"
        );
    }
}
