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

/// What a check of the whole file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CsvSummary {
    pub rows: u64,
    pub has_header: bool,
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

/// Reads every row once: what an upload is checked with before it is accepted.
pub fn check<R: Read>(input: R) -> Result<CsvSummary, CsvError> {
    let mut rows = 0u64;
    let mut has_header = false;
    for (i, record) in reader(input).records().enumerate() {
        let record = record.map_err(classify)?;
        if i == 0 {
            has_header = text_column(&record).1;
            if has_header {
                continue;
            }
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(CsvError::Empty);
    }
    Ok(CsvSummary { rows, has_header })
}

/// The texts of the file in row order, starting after `skip` rows (a resumed job).
pub struct TextRows<R: Read> {
    records: csv::StringRecordsIntoIter<R>,
    column: usize,
    pending_first: Option<String>,
}

impl<R: Read> TextRows<R> {
    pub fn open(input: R, skip: u64) -> Result<Self, CsvError> {
        let mut records = reader(input).into_records();
        let mut column = 0;
        let mut pending_first = None;
        if let Some(first) = records.next() {
            let first = first.map_err(classify)?;
            let (col, header) = text_column(&first);
            column = col;
            if !header {
                pending_first = Some(cell(&first, 0, true));
            }
        }
        let mut rows = Self {
            records,
            column,
            pending_first,
        };
        for _ in 0..skip {
            if rows.next().transpose()?.is_none() {
                break;
            }
        }
        Ok(rows)
    }
}

fn cell(record: &csv::StringRecord, column: usize, first_row: bool) -> String {
    let value = record.get(column).unwrap_or("");
    if first_row && column == 0 {
        strip_bom(value).to_string()
    } else {
        value.to_string()
    }
}

impl<R: Read> Iterator for TextRows<R> {
    type Item = Result<String, CsvError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(first) = self.pending_first.take() {
            return Some(Ok(first));
        }
        self.records.next().map(|r| {
            r.map(|rec| cell(&rec, self.column, false))
                .map_err(classify)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(data: &str, skip: u64) -> Vec<String> {
        TextRows::open(data.as_bytes(), skip)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn rows_with_and_without_header() {
        assert_eq!(texts("a\nb\n", 0), vec!["a", "b"]);
        assert_eq!(texts("text\na\nb\n", 0), vec!["a", "b"]);
        assert_eq!(texts("id,Text\n1,a\n2,b\n", 0), vec!["a", "b"]);
        assert_eq!(
            check("text\na\nb\n".as_bytes()).unwrap(),
            CsvSummary {
                rows: 2,
                has_header: true
            }
        );
    }

    #[test]
    fn quoted_fields_bom_and_resume() {
        let data = "\u{feff}\"first, with comma\"\n\"multi\nline\"\nthird\n";
        assert_eq!(
            texts(data, 0),
            vec!["first, with comma", "multi\nline", "third"]
        );
        assert_eq!(texts(data, 2), vec!["third"]);
        assert_eq!(check(data.as_bytes()).unwrap().rows, 3);
        assert_eq!(texts("\u{feff}text\nx\n", 0), vec!["x"]);
    }

    #[test]
    fn bad_files_are_named() {
        assert_eq!(check("".as_bytes()), Err(CsvError::Empty));
        assert_eq!(check("text\n".as_bytes()), Err(CsvError::Empty));
        assert!(matches!(
            check(&[0xff, 0xfe, 0x00, 0x41][..]),
            Err(CsvError::NotText(_))
        ));
    }
}
