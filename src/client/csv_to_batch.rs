//! `ollama-batch csv-to-batch`: a CSV of candidates → a Batch API input file (JSONL), one chat
//! request per row, streamed (170,000 rows in seconds, memory bounded by the set of ids seen).
//! `--sample N` writes a synthetic candidates CSV to try everything without real data.

use clap::Args;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// How each CSV row becomes a request: shared by `csv-to-batch` and `run` (given a CSV).
#[derive(Args, Debug, Clone, Default)]
pub struct RequestShape {
    /// The column with each row's id (its custom_id). Default: `candidate_id` when the CSV has
    /// it, else the row number (`row-1`, `row-2`, …).
    #[arg(long)]
    pub id_column: Option<String>,
    /// The system prompt (the rubric), read from this file; sent identically on every line.
    #[arg(long)]
    pub system: Option<PathBuf>,
    /// The user message, with `{column}` for a column's value (`{{` and `}}` for braces; `\n`
    /// and `\t` for a line break and a tab). Default: every non-empty column but the id as
    /// `Column: value` lines.
    #[arg(long)]
    pub template: Option<String>,
    /// `max_tokens` of each request.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// `temperature` of each request.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// A JSON schema (file) the answer must follow: sent as `response_format` (the Ollama
    /// backend turns it into `format`).
    #[arg(long)]
    pub json_schema: Option<PathBuf>,
}

/// Flags of `csv-to-batch`.
#[derive(Args, Debug, Clone)]
#[command(after_help = "Examples:\n  \
ollama-batch csv-to-batch --sample 1000 sample.csv\n  \
ollama-batch csv-to-batch candidates.csv -o candidates.jsonl --model gemma3:12b --system rubric.md \\\n      \
--max-tokens 200 --temperature 0 --json-schema answer.schema.json\n  \
ollama-batch csv-to-batch people.csv --model m --id-column email --template 'Name: {name}\\nCV: {cv}'\n\n\
Rows without an id, or with an id seen before, are skipped and reported (exit 0); a template \
naming an unknown column, an unreadable file or a CSV error exit 1.")]
pub struct CsvArgs {
    /// The CSV (with a header row). With --sample, the CSV to create.
    pub csv: PathBuf,
    /// Write the JSONL here (default: standard output).
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// The model each line names (the server's --model / --model-map can still map it).
    #[arg(long, required_unless_present = "sample")]
    pub model: Option<String>,
    /// How each row becomes a request.
    #[command(flatten)]
    pub shape: RequestShape,
    /// Requests per second measured on your setup (`bench` prints it), to estimate the run's
    /// duration.
    #[arg(long)]
    pub rate: Option<f64>,
    /// A llama.cpp server (`llama-server`) whose `/tokenize` counts the prompt tokens of the
    /// system prompt and of a sample of rows, for an estimate in real tokens instead of
    /// characters ÷ 4.
    #[arg(long, value_name = "URL")]
    pub tokenizer_url: Option<String>,
    /// Instead: write N synthetic candidate rows to CSV (which must not exist yet) and stop.
    #[arg(long, value_name = "N")]
    pub sample: Option<u64>,
}

/// One piece of a parsed template.
#[derive(Debug, PartialEq)]
enum Piece {
    Text(String),
    Column(usize),
}

/// Parses a template against the header: unknown columns are an error naming the known ones.
fn parse_template(t: &str, header: &[String]) -> Result<Vec<Piece>, String> {
    let t = t.replace("\\n", "\n").replace("\\t", "\t");
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => name.push(ch),
                        None => return Err(format!("--template: '{{{name}' is not closed")),
                    }
                }
                let i = header
                    .iter()
                    .position(|h| h == name.trim())
                    .ok_or_else(|| {
                        format!(
                            "--template: no column '{}' in the CSV (its columns: {})",
                            name.trim(),
                            header.join(", ")
                        )
                    })?;
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Column(i));
            }
            '}' => return Err("--template: a lone '}' (write '}}' for a brace)".into()),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// What a conversion did.
#[derive(Debug, Default)]
pub struct Report {
    /// Data rows read.
    pub rows: u64,
    /// Lines written.
    pub written: u64,
    /// Rows without an id.
    pub missing_id: Vec<u64>,
    /// Rows whose id came earlier: (row, id).
    pub duplicate_id: Vec<(u64, String)>,
    /// Characters of every request's messages (system prompt included on every line).
    pub message_chars: u64,
    /// The system prompt, when there is one (to count its tokens once).
    pub system: Option<String>,
    /// The user messages of the first [`TOKEN_SAMPLE`] lines written (to count tokens on).
    pub sample_users: Vec<String>,
    /// Rows with fewer fields than the header (the missing ones are empty).
    pub short_rows: Vec<u64>,
    /// Why the first row may not be a header (it is read as one all the same).
    pub header_warning: Option<String>,
}

/// Lines whose user message is tokenized for an estimate in real tokens.
pub const TOKEN_SAMPLE: usize = 200;

/// Prompt tokens of the whole file, counted by a llama.cpp server's `/tokenize` on the system
/// prompt and a sample of user messages, scaled to every line written. The chat template adds a
/// few tokens a line that this does not count.
pub async fn count_tokens(url: &str, r: &Report) -> Result<u64, String> {
    let http = crate::backend::http_client(None)?
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{}/tokenize", url.trim_end_matches('/'));
    let count = |text: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let v: Value = http
                .post(&url)
                .json(&json!({"content": text}))
                .send()
                .await
                .map_err(|e| format!("--tokenizer-url: cannot reach {url}: {e}"))?
                .error_for_status()
                .map_err(|e| format!("--tokenizer-url: {e}"))?
                .json()
                .await
                .map_err(|e| format!("--tokenizer-url: the answer is not JSON: {e}"))?;
            v["tokens"]
                .as_array()
                .map(|t| t.len() as u64)
                .ok_or_else(|| format!("--tokenizer-url: {url} answered without `tokens` (is it a llama.cpp server?)"))
        }
    };
    let system = match &r.system {
        Some(s) => count(s.clone()).await?,
        None => 0,
    };
    let mut users = 0;
    for u in &r.sample_users {
        users += count(u.clone()).await?;
    }
    let per_user = users as f64 / r.sample_users.len().max(1) as f64;
    Ok(((system as f64 + per_user) * r.written as f64).round() as u64)
}

const FIRST: [&str; 16] = [
    "Ana",
    "Bilal",
    "Chloé",
    "Dmitri",
    "Efua",
    "Felipe",
    "Grace",
    "Hiroshi",
    "Ines",
    "Jamal",
    "Katarzyna",
    "Liam",
    "Mei",
    "Nikolai",
    "Olga",
    "Priya",
];
const LAST: [&str; 12] = [
    "Silva", "Okafor", "Müller", "Nguyen", "García", "Kowalski", "Haddad", "Tanaka", "Olsen",
    "Ivanova", "O'Brien", "Sharma",
];
const ROLES: [&str; 8] = [
    "Backend Engineer",
    "Data Scientist",
    "Site Reliability Engineer",
    "Frontend Developer",
    "ML Engineer",
    "Engineering Manager",
    "Security Analyst",
    "Mobile Developer",
];
const SKILLS: [&str; 14] = [
    "Rust",
    "Python",
    "Go",
    "Kubernetes",
    "PostgreSQL",
    "PyTorch",
    "React",
    "AWS",
    "Terraform",
    "Kafka",
    "TypeScript",
    "Swift",
    "CUDA",
    "Spark",
];

/// Writes `n` synthetic candidates (deterministic) as CSV.
pub fn write_sample(path: &std::path::Path, n: u64) -> Result<(), String> {
    if path.exists() {
        return Err(format!(
            "{} exists: remove it or name another file for --sample",
            path.display()
        ));
    }
    let file = std::fs::File::create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut w = csv::Writer::from_writer(BufWriter::with_capacity(1 << 20, file));
    let err = |e: csv::Error| format!("cannot write {}: {e}", path.display());
    w.write_record([
        "candidate_id",
        "name",
        "current_role",
        "years_experience",
        "skills",
        "summary",
    ])
    .map_err(err)?;
    let mut rng = fastrand::Rng::with_seed(170_000);
    for i in 1..=n {
        let name = format!(
            "{} {}",
            FIRST[rng.usize(..FIRST.len())],
            LAST[rng.usize(..LAST.len())]
        );
        let role = ROLES[rng.usize(..ROLES.len())];
        let years = rng.u32(0..25);
        let mut skills: Vec<&str> = (0..rng.usize(2..6))
            .map(|_| SKILLS[rng.usize(..SKILLS.len())])
            .collect();
        skills.sort();
        skills.dedup();
        let summary = format!(
            "{years} year{} as {role}; led {} projects, \"{}\" was the largest. Prefers {} teams.",
            if years == 1 { "" } else { "s" },
            rng.u32(1..12),
            [
                "a payments rewrite",
                "an ML platform",
                "a mobile launch",
                "a data lake"
            ][rng.usize(..4)],
            ["small", "remote", "cross-functional", "research"][rng.usize(..4)]
        );
        w.write_record([
            format!("cand-{i:06}"),
            name,
            role.to_string(),
            years.to_string(),
            skills.join(", "),
            summary,
        ])
        .map_err(err)?;
    }
    w.flush()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// Converts the CSV; the JSONL goes to `out`.
pub fn convert(
    csv_path: &Path,
    args: &RequestShape,
    model: &str,
    out: &mut dyn Write,
) -> Result<Report, String> {
    let system = match &args.system {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read --system {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let schema: Option<Value> = match &args.json_schema {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read --json-schema {}: {e}", p.display()))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| format!("--json-schema {} is not JSON: {e}", p.display()))?,
            )
        }
        None => None,
    };
    if let (Some(p), Some(s)) = (&args.json_schema, &schema)
        && !s.is_object()
    {
        return Err(format!(
            "--json-schema {}: the file is JSON but not a JSON Schema object ({{\"type\": \"object\", …}}), the shape each answer must follow",
            p.display()
        ));
    }
    // The server checks every answer against it: a schema that is not one is refused here,
    // before a file of lines that would all be refused at validation is written.
    if let (Some(p), Some(s)) = (&args.json_schema, &schema)
        && let Err(e) = crate::answer::compile(s)
    {
        return Err(format!("--json-schema {}: {e}", p.display()));
    }
    // A quote opened and never closed would make the rest of the file one field: refuse it
    // before anything is written, naming the line where it opened.
    let file = std::fs::File::open(csv_path)
        .map_err(|e| format!("cannot read {}: {e}", csv_path.display()))?;
    if let Some(line) = unterminated_quote(std::io::BufReader::with_capacity(1 << 20, file))
        .map_err(|e| format!("cannot read {}: {e}", csv_path.display()))?
    {
        return Err(format!(
            "{}: the quote opened on line {line} is never closed: every later row would be read as part of one field. Fix that line (a field that contains a quote must double it: \"\") and run again",
            csv_path.display()
        ));
    }
    let file = std::fs::File::open(csv_path)
        .map_err(|e| format!("cannot read {}: {e}", csv_path.display()))?;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(std::io::BufReader::with_capacity(1 << 20, file));
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| format!("{}: cannot read the header row: {e}", csv_path.display()))?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').trim().to_string())
        .collect();
    let header_warning =
        check_header(&header).map_err(|e| format!("{}: {e}", csv_path.display()))?;
    let id_col = match &args.id_column {
        Some(c) => Some(header.iter().position(|h| h == c).ok_or_else(|| {
            format!(
                "--id-column: no column '{c}' in the CSV (its columns: {})",
                header.join(", ")
            )
        })?),
        None => header.iter().position(|h| h == "candidate_id"),
    };
    let template = match &args.template {
        Some(t) => Some(parse_template(t, &header)?),
        None => None,
    };
    let mut report = Report {
        header_warning,
        ..Report::default()
    };
    let mut seen: HashSet<String> = HashSet::new();
    let mut long_rows: Vec<u64> = Vec::new();
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(format!("{}: {e}", csv_path.display())),
        }
        report.rows += 1;
        let row = report.rows;
        match record.len().cmp(&header.len()) {
            std::cmp::Ordering::Greater => long_rows.push(row),
            std::cmp::Ordering::Less => report.short_rows.push(row),
            std::cmp::Ordering::Equal => {}
        }
        let id = match id_col {
            Some(i) => record.get(i).map(str::trim).unwrap_or_default().to_string(),
            None => format!("row-{row}"),
        };
        if id.is_empty() {
            report.missing_id.push(row);
            continue;
        }
        if !seen.insert(id.clone()) {
            report.duplicate_id.push((row, id));
            continue;
        }
        let user = match &template {
            Some(pieces) => pieces
                .iter()
                .map(|p| match p {
                    Piece::Text(t) => t.as_str(),
                    Piece::Column(i) => record.get(*i).unwrap_or_default(),
                })
                .collect::<String>(),
            None => header
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != id_col)
                .filter_map(|(i, h)| {
                    let v = record.get(i).map(str::trim).unwrap_or_default();
                    (!v.is_empty()).then(|| format!("{h}: {v}"))
                })
                .collect::<Vec<_>>()
                .join("\n"),
        };
        let mut messages = Vec::with_capacity(2);
        if let Some(s) = &system {
            messages.push(json!({"role": "system", "content": s}));
            report.message_chars += s.chars().count() as u64;
            if report.system.is_none() {
                report.system = Some(s.clone());
            }
        }
        report.message_chars += user.chars().count() as u64;
        if report.sample_users.len() < TOKEN_SAMPLE {
            report.sample_users.push(user.clone());
        }
        messages.push(json!({"role": "user", "content": user}));
        let mut body = json!({"model": model, "messages": messages});
        if let Some(n) = args.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(t) = args.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(s) = &schema {
            body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": s, "strict": true}});
        }
        let line =
            json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body});
        writeln!(out, "{line}").map_err(|e| format!("cannot write the output: {e}"))?;
        report.written += 1;
    }
    if !long_rows.is_empty() {
        return Err(format!(
            "{}: {} row(s) have more fields than the header's {} ({}): their extra fields would be lost. A field that contains a comma must be quoted; fix those rows and run again",
            csv_path.display(),
            long_rows.len(),
            header.len(),
            rows_list(&long_rows)
        ));
    }
    out.flush()
        .map_err(|e| format!("cannot write the output: {e}"))?;
    Ok(report)
}

/// `rows 3, 7, 9, …` (the first five).
fn rows_list(rows: &[u64]) -> String {
    let shown: Vec<String> = rows.iter().take(5).map(|n| n.to_string()).collect();
    format!(
        "row{} {}{}",
        if rows.len() == 1 { "" } else { "s" },
        shown.join(", "),
        if rows.len() > 5 { ", …" } else { "" }
    )
}

/// The line (1-based) where a quoted field opens that the file never closes, as the CSV
/// reader reads quotes: a quote at the start of a field opens it, a doubled quote inside is a
/// quote, and the next single one closes it. `None` when every quote is closed.
pub fn unterminated_quote(mut r: impl std::io::BufRead) -> std::io::Result<Option<u64>> {
    let (mut line, mut opened_on) = (1u64, 0u64);
    let (mut in_quotes, mut at_field_start, mut quote_pending) = (false, true, false);
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        for &b in buf {
            if in_quotes {
                if quote_pending {
                    quote_pending = false;
                    if b == b'"' {
                        continue; // a doubled quote: a quote character in the field
                    }
                    in_quotes = false; // the previous quote closed the field
                } else if b == b'"' {
                    quote_pending = true;
                    continue;
                } else {
                    if b == b'\n' {
                        line += 1;
                    }
                    continue;
                }
            }
            match b {
                b'"' if at_field_start => {
                    in_quotes = true;
                    opened_on = line;
                    at_field_start = false;
                }
                b',' => at_field_start = true,
                b'\n' => {
                    line += 1;
                    at_field_start = true;
                }
                b'\r' => {}
                _ => at_field_start = false,
            }
        }
        let n = buf.len();
        r.consume(n);
    }
    Ok((in_quotes && !quote_pending).then_some(opened_on))
}

/// The header row's problems: an error when it cannot be used as it is (one column holding
/// `;`-separated names, a name twice), else a warning when it may be a data row (a file
/// exported without a header: then its first candidate would be taken for column names).
fn check_header(header: &[String]) -> Result<Option<String>, String> {
    if header.len() == 1 && header[0].contains(';') {
        return Err(format!(
            "the header is one column, '{}': the file looks ';'-separated. csv-to-batch reads comma-separated files: export it with commas (in a spreadsheet: CSV, comma delimited)",
            crate::domain::clip(&header[0], 80)
        ));
    }
    let mut seen = HashSet::new();
    for h in header.iter().filter(|h| !h.is_empty()) {
        if !seen.insert(h.as_str()) {
            return Err(format!(
                "the column '{h}' is named twice in the header: which one a prompt should use is unclear. Rename one and run again"
            ));
        }
    }
    let odd: Vec<&str> = header
        .iter()
        .map(String::as_str)
        .filter(|h| {
            h.is_empty() || h.parse::<f64>().is_ok() || h.contains('@') || h.chars().count() > 60
        })
        .collect();
    Ok((!odd.is_empty()).then(|| {
        format!(
            "the first row may not be a header (it has {}): it is read as the column names, so if the file has no header its first candidate is not in the batch",
            odd.iter()
                .take(3)
                .map(|h| if h.is_empty() { "an empty name".to_string() } else { format!("'{}'", crate::domain::clip(h, 40)) })
                .collect::<Vec<_>>()
                .join(", ")
        )
    }))
}

/// Converts the CSV into the JSONL file `output`, written beside it under a temporary name and
/// renamed into place only when the whole file is written (an error leaves an earlier file as
/// it was). Refuses an output that is the input, by any path (a symlink, `./`): opening it
/// for writing would truncate the CSV before it is read.
pub fn convert_to_file(
    csv_path: &Path,
    args: &RequestShape,
    model: &str,
    output: &Path,
) -> Result<Report, String> {
    if same_file(csv_path, output) {
        return Err(format!(
            "-o {} is the input file itself: writing it would destroy the CSV. Name another output file",
            output.display()
        ));
    }
    // Not a regular file (`/dev/null`, a pipe): written as it is; renaming a file over it
    // would replace the device.
    if std::fs::metadata(output).is_ok_and(|m| !m.is_file()) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(output)
            .map_err(|e| format!("cannot write {}: {e}", output.display()))?;
        return convert(csv_path, args, model, &mut f);
    }
    // A symlink keeps pointing where it did: the file it names is the one replaced.
    let resolved = std::fs::canonicalize(output).ok();
    let output = resolved.as_deref().unwrap_or(output);
    let dir = output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))
        .and_then(|mut f| {
            let report = convert(csv_path, args, model, &mut f)?;
            f.sync_all()
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            Ok(report)
        })
        .and_then(|report| {
            std::fs::rename(&tmp, output)
                .map_err(|e| format!("cannot write {}: {e}", output.display()))?;
            Ok(report)
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Whether two paths name the same file (device and inode; an output that does not exist yet
/// is not the input).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The duration estimate printed after the summary.
pub fn duration(lines: u64, rate: Option<f64>) -> String {
    match rate {
        Some(rate) if rate > 0.0 => {
            let secs = (lines as f64 / rate).ceil() as u64;
            format!(
                "duration: about {} at {rate} requests/s",
                humantime::format_duration(std::time::Duration::from_secs(secs))
            )
        }
        _ => "duration: pass --rate (requests/s measured on your setup: `ollama-batch bench` prints it) for an estimate".into(),
    }
}

/// The summary printed on standard error.
pub fn summary(r: &Report, counted: Option<u64>) -> String {
    let mut s = format!(
        "{} rows read, {} lines written, {} skipped",
        r.rows,
        r.written,
        r.missing_id.len() + r.duplicate_id.len()
    );
    if !r.missing_id.is_empty() {
        let rows: Vec<String> = r.missing_id.iter().take(5).map(|n| n.to_string()).collect();
        s.push_str(&format!(
            "\n  {} without an id (rows {}{})",
            r.missing_id.len(),
            rows.join(", "),
            if r.missing_id.len() > 5 { ", …" } else { "" }
        ));
    }
    if !r.duplicate_id.is_empty() {
        let rows: Vec<String> = r
            .duplicate_id
            .iter()
            .take(5)
            .map(|(n, id)| format!("row {n}: '{}'", id.chars().take(40).collect::<String>()))
            .collect();
        s.push_str(&format!(
            "\n  {} with an id seen before, kept the first ({}{})",
            r.duplicate_id.len(),
            rows.join(", "),
            if r.duplicate_id.len() > 5 {
                ", …"
            } else {
                ""
            }
        ));
    }
    if !r.short_rows.is_empty() {
        s.push_str(&format!(
            "\n  {} with fewer fields than the header ({}): the missing fields are empty",
            r.short_rows.len(),
            rows_list(&r.short_rows)
        ));
    }
    if let Some(w) = &r.header_warning {
        s.push_str(&format!("\n  warning: {w}"));
    }
    match counted {
        Some(n) => s.push_str(&format!(
            "\nprompt tokens: about {n} (counted by the backend's tokenizer on the system prompt and {} rows, scaled to every line; the chat template adds a few a line)",
            r.sample_users.len()
        )),
        None => s.push_str(&format!(
            "\nprompt tokens: about {} (an approximation: characters ÷ 4, the system prompt counted on every line; --tokenizer-url with a llama.cpp server counts real tokens)",
            r.message_chars / 4
        )),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_columns_and_escape_braces() {
        let header: Vec<String> = ["id", "name", "years"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = parse_template("Name: {name}\\nYears: {years} {{x}}", &header).expect("ok");
        assert_eq!(
            p,
            vec![
                Piece::Text("Name: ".into()),
                Piece::Column(1),
                Piece::Text("\nYears: ".into()),
                Piece::Column(2),
                Piece::Text(" {x}".into()),
            ]
        );
        let e = parse_template("{nope}", &header).expect_err("unknown");
        assert!(
            e.contains("no column 'nope'") && e.contains("id, name, years"),
            "{e}"
        );
        assert!(parse_template("{name", &header).is_err());
        assert!(parse_template("a } b", &header).is_err());
    }
}
