//! Reading the uploaded CSV: one text per row, quoted fields (with commas and newlines) allowed,
//! UTF-8 with or without BOM, with or without a header row.

use std::io::Read;

/// Header names recognised in the first row; the text is taken from that column.
const TEXT_HEADERS: [&str; 7] = [
    "text",
    "texts",
    "input",
    "sentence",
    "sentences",
    "content",
    "document",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsvError {
    #[error("the file is not UTF-8 text: {0}")]
    NotText(String),
    #[error("the CSV could not be read: {0}")]
    Malformed(String),
    #[error("the CSV has no rows to embed")]
    Empty,
}

/// Rows `first_row..first_row + rows` of a job, stored at bytes `byte_start..byte_end` of its
/// upload: the unit a worker claims, embeds and commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    pub first_row: u64,
    pub rows: u64,
    pub byte_start: u64,
    pub byte_end: u64,
}

impl ChunkPlan {
    /// Chunks of `chunk_rows` rows of `rows` in all, from the byte offset where each chunk's
    /// first row starts; the last ends at `end`.
    pub fn from_starts(starts: &[u64], rows: u64, chunk_rows: u64, end: u64) -> Vec<ChunkPlan> {
        starts
            .iter()
            .enumerate()
            .map(|(i, &byte_start)| {
                let first_row = i as u64 * chunk_rows;
                ChunkPlan {
                    first_row,
                    rows: chunk_rows.min(rows - first_row),
                    byte_start,
                    byte_end: starts.get(i + 1).copied().unwrap_or(end),
                }
            })
            .collect()
    }
}

/// What a check of the whole file found, and how it splits into chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvSummary {
    pub rows: u64,
    pub has_header: bool,
    /// The column the texts are read from.
    pub text_column: usize,
    pub chunks: Vec<ChunkPlan>,
}

fn reader<R: Read>(input: R) -> csv::Reader<R> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(input)
}

fn strip_bom(s: &str) -> &str {
    s.strip_prefix('\u{feff}').unwrap_or(s)
}

/// Which column holds the text, and whether the first row is a header naming it.
fn text_column(first: &csv::StringRecord) -> (usize, bool) {
    first
        .iter()
        .position(|cell| TEXT_HEADERS.contains(&strip_bom(cell).trim().to_lowercase().as_str()))
        .map_or((0, false), |i| (i, true))
}

fn classify(e: csv::Error) -> CsvError {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => CsvError::NotText(e.to_string()),
        _ => CsvError::Malformed(e.to_string()),
    }
}

/// Reads every row once, as an upload is checked before it is accepted, and plans its chunks
/// of `chunk_rows` rows by the byte offsets where their first records start: a worker on any
/// replica reads only its chunk's bytes.
pub fn check<R: Read>(input: R, chunk_rows: u64) -> Result<CsvSummary, CsvError> {
    let chunk_rows = chunk_rows.max(1);
    let mut reader = reader(input);
    let mut rows = 0u64;
    let mut has_header = false;
    let mut column = 0;
    let mut starts = Vec::new();
    let mut record = csv::StringRecord::new();
    let mut first = true;
    while reader.read_record(&mut record).map_err(classify)? {
        if first {
            first = false;
            (column, has_header) = text_column(&record);
            if has_header {
                continue;
            }
        }
        if rows.is_multiple_of(chunk_rows) {
            starts.push(record.position().map_or(0, |p| p.byte()));
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(CsvError::Empty);
    }
    let chunks = ChunkPlan::from_starts(&starts, rows, chunk_rows, reader.position().byte());
    Ok(CsvSummary {
        rows,
        has_header,
        text_column: column,
        chunks,
    })
}

/// The texts of one planned chunk, from its bytes of the upload.
pub fn chunk_texts(bytes: &[u8], plan: &ChunkPlan, column: usize) -> Result<Vec<String>, CsvError> {
    // The reader drops a byte-order mark at the start of what it reads. Only the file's own
    // start may lose one: a chunk whose first cell starts with the mark gets a second in front
    // (in the same buffer: the reader takes a read that leaves nothing as the end), so it reads
    // as it does in the whole file.
    const BOM: &[u8] = "\u{feff}".as_bytes();
    let marked;
    let bytes = if plan.byte_start > 0 && bytes.starts_with(BOM) {
        marked = [BOM, bytes].concat();
        &marked[..]
    } else {
        bytes
    };
    let mut texts = Vec::with_capacity(plan.rows as usize);
    for record in reader(bytes).into_records() {
        let record = record.map_err(classify)?;
        texts.push(record.get(column).unwrap_or("").to_string());
    }
    if texts.len() as u64 != plan.rows {
        return Err(CsvError::Malformed(format!(
            "chunk at row {} holds {} rows, {} were planned",
            plan.first_row,
            texts.len(),
            plan.rows
        )));
    }
    Ok(texts)
}

/// Every text of a file, chunk by chunk: what the workers together read.
pub fn all_texts(bytes: &[u8], summary: &CsvSummary) -> Result<Vec<String>, CsvError> {
    let mut texts = Vec::with_capacity(summary.rows as usize);
    for plan in &summary.chunks {
        let slice = &bytes[plan.byte_start as usize..plan.byte_end as usize];
        texts.extend(chunk_texts(slice, plan, summary.text_column)?);
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(data: &str, chunk_rows: u64) -> Vec<String> {
        let summary = check(data.as_bytes(), chunk_rows).unwrap();
        all_texts(data.as_bytes(), &summary).unwrap()
    }

    #[test]
    fn rows_with_and_without_header() {
        assert_eq!(texts("a\nb\n", 1), vec!["a", "b"]);
        assert_eq!(texts("text\na\nb\n", 1), vec!["a", "b"]);
        assert_eq!(texts("id,Text\n1,a\n2,b\n", 2), vec!["a", "b"]);
        let summary = check("text\na\nb\nc\n".as_bytes(), 2).unwrap();
        assert_eq!((summary.rows, summary.has_header), (3, true));
        assert_eq!(
            summary.chunks,
            [
                ChunkPlan {
                    first_row: 0,
                    rows: 2,
                    byte_start: 5,
                    byte_end: 9
                },
                ChunkPlan {
                    first_row: 2,
                    rows: 1,
                    byte_start: 9,
                    byte_end: 11
                }
            ]
        );
    }

    #[test]
    fn quoted_fields_bom_and_chunks() {
        let data = "\u{feff}\"first, with comma\"\n\"multi\nline\"\nthird\n";
        for chunk_rows in [1, 2, 3, 10] {
            assert_eq!(
                texts(data, chunk_rows),
                vec!["first, with comma", "multi\nline", "third"]
            );
        }
        assert_eq!(check(data.as_bytes(), 2).unwrap().rows, 3);
        assert_eq!(texts("\u{feff}text\nx\n", 1), vec!["x"]);
    }

    #[test]
    fn bad_files_are_named() {
        assert_eq!(check("".as_bytes(), 1), Err(CsvError::Empty));
        assert_eq!(check("text\n".as_bytes(), 1), Err(CsvError::Empty));
        assert!(matches!(
            check(&[0xff, 0xfe, 0x00, 0x41][..], 1),
            Err(CsvError::NotText(_))
        ));
    }
}
