//! `ollama-batch analyze`: reads a batch's output (and error) file and reports what came back:
//! successes and failures by error code, the distribution of one answer field, answers that did
//! not parse, tokens; optionally one CSV row per line. Answers are parsed as JSON (also inside a
//! Markdown code fence, which models often add, or as the first `{…}` in the text) or as a bare
//! number.

use clap::Args;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

/// Flags of `analyze`.
#[derive(Args, Debug, Clone)]
#[command(after_help = "Example:\n  \
ollama-batch analyze candidates.output.jsonl --errors candidates.errors.jsonl \\\n      \
--input candidates.jsonl --field score --csv scores.csv --plot scores.svg\n\n\
Answers are read as JSON, JSON inside a Markdown code fence, the first {...} in the text, or a \
bare number. A numeric field gets count, min, max, mean, median, percentiles and a histogram; \
text values are counted as categories.")]
pub struct AnalyzeArgs {
    /// The batch's output file (JSONL).
    pub output: PathBuf,
    /// Its error file.
    #[arg(long)]
    pub errors: Option<PathBuf>,
    /// The input file: lines in neither file are reported as not run.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// The answer field whose distribution to report (e.g. `score`); a bare-number answer is
    /// its value.
    #[arg(long)]
    pub field: Option<String>,
    /// Write one row per custom_id: the answer's fields as columns, status, error, tokens.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Draw an SVG: the --field's histogram (or category counts) and, when the answers carry
    /// their completion time (`created`), lines finished over time.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// Integer answers spanning at most this many values get one bin per integer.
const MAX_INTEGER_BINS: f64 = 50.0;

/// Whether every number is an integer and they span few enough values for one bin each.
pub fn integer_valued(numbers: &[f64], s: &Stats) -> bool {
    !numbers.is_empty()
        && numbers.iter().all(|v| v.fract() == 0.0)
        && s.max - s.min < MAX_INTEGER_BINS
}

/// The histogram: one bin per integer (edges k ± 0.5) when every answer is an integer over a
/// small range (scores 1-10), else 10 equal bins from min to max; (low edge, high edge, count).
pub fn bins(numbers: &[f64], s: &Stats) -> Vec<(f64, f64, usize)> {
    if integer_valued(numbers, s) {
        let n = (s.max - s.min) as usize + 1;
        let mut counts = vec![0usize; n];
        for v in numbers {
            counts[((v - s.min) as usize).min(n - 1)] += 1;
        }
        return counts
            .into_iter()
            .enumerate()
            .map(|(i, c)| (s.min + i as f64 - 0.5, s.min + i as f64 + 0.5, c))
            .collect();
    }
    let n = if s.max > s.min { 10usize } else { 1 };
    let width = (s.max - s.min) / n as f64;
    let mut counts = vec![0usize; n];
    for v in numbers {
        let i = if width > 0.0 {
            (((v - s.min) / width) as usize).min(n - 1)
        } else {
            0
        };
        counts[i] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, c)| (s.min + width * i as f64, s.min + width * (i + 1) as f64, c))
        .collect()
}

/// An answer parsed: a JSON object's fields, or a bare number.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// A JSON object.
    Object(Map<String, Value>),
    /// A bare number.
    Number(f64),
}

/// Parses a model's answer text.
pub fn parse_answer(text: &str) -> Option<Parsed> {
    let t = text.trim();
    if let Ok(n) = t.parse::<f64>()
        && n.is_finite()
    {
        return Some(Parsed::Number(n));
    }
    let mut candidates = vec![t.to_string()];
    // ```json … ``` or ``` … ```
    if let Some(start) = t.find("```") {
        let after = &t[start + 3..];
        let after = after
            .strip_prefix("json")
            .or_else(|| after.strip_prefix("JSON"))
            .unwrap_or(after);
        if let Some(end) = after.find("```") {
            candidates.push(after[..end].trim().to_string());
        }
    }
    if let (Some(a), Some(b)) = (t.find('{'), t.rfind('}'))
        && a < b
    {
        candidates.push(t[a..=b].to_string());
    }
    for c in candidates {
        match serde_json::from_str::<Value>(&c) {
            Ok(Value::Object(m)) => return Some(Parsed::Object(m)),
            Ok(Value::Number(n)) => return n.as_f64().map(Parsed::Number),
            _ => {}
        }
    }
    None
}

/// One CSV row: custom_id, the parsed answer, status, error code, prompt and completion tokens.
type Row = (String, Option<Parsed>, &'static str, String, u64, u64);

/// The answer text of an output line's body.
fn answer_text(body: &Value) -> Option<&str> {
    body["choices"][0]["message"]["content"]
        .as_str()
        .or_else(|| body["choices"][0]["text"].as_str())
}

/// Numbers' summary.
#[derive(Debug, PartialEq)]
pub struct Stats {
    /// How many.
    pub count: usize,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Median (the mean of the two middle values for an even count).
    pub median: f64,
    /// 10th, 25th, 75th, 90th percentiles (nearest rank).
    pub p10: f64,
    /// 25th.
    pub p25: f64,
    /// 75th.
    pub p75: f64,
    /// 90th.
    pub p90: f64,
}

/// Summary of a list of numbers (`None` when empty).
pub fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let rank = |q: f64| v[(((q * n as f64).ceil() as usize).max(1) - 1).min(n - 1)];
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        count: n,
        min: v[0],
        max: v[n - 1],
        mean: v.iter().sum::<f64>() / n as f64,
        median,
        p10: rank(0.10),
        p25: rank(0.25),
        p75: rank(0.75),
        p90: rank(0.90),
    })
}

fn read_jsonl(path: &PathBuf) -> Result<Vec<Value>, String> {
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .map_err(|e| format!("{} line {} is not JSON: {e}", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

/// The error code of an error-file line.
fn error_code(l: &Value) -> String {
    l["error"]["code"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            let b = &l["response"]["body"]["error"];
            b["code"]
                .as_str()
                .or_else(|| b["type"].as_str())
                .map(str::to_string)
        })
        .or_else(|| {
            l["response"]["status_code"]
                .as_u64()
                .map(|s| format!("http_{s}"))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Runs the analysis; the report is written to `out`.
pub fn analyze(args: &AnalyzeArgs, out: &mut dyn Write) -> Result<(), String> {
    // An error line (its `error` set, or a non-2xx response) is a failure wherever it is: an
    // errors file given as the output file is not a file of successes.
    let (outputs, misplaced): (Vec<Value>, Vec<Value>) =
        read_jsonl(&args.output)?.into_iter().partition(|l| {
            l["error"].is_null()
                && l["response"]["status_code"]
                    .as_u64()
                    .is_some_and(|s| (200..300).contains(&s))
        });
    let mut errors = match &args.errors {
        Some(p) => read_jsonl(p)?,
        None => Vec::new(),
    };
    if !misplaced.is_empty() {
        writeln!(
            out,
            "note: {} line(s) of {} are error lines{}; they are counted as failed",
            misplaced.len(),
            args.output.display(),
            if outputs.is_empty() {
                " (it looks like an errors file)"
            } else {
                ""
            }
        )
        .map_err(|e| e.to_string())?;
        errors.extend(misplaced);
    }
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let mut numbers = Vec::new();
    let mut categories: BTreeMap<String, usize> = BTreeMap::new();
    let mut unparsed: Vec<(String, String)> = Vec::new();
    let mut missing_field = 0usize;
    let mut invalid: Vec<(String, String)> = Vec::new();
    let (mut prompt, mut completion, mut cached, mut cached_reported, mut cached_unreported) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut rows: Vec<Row> = Vec::new();
    let mut seen: HashMap<String, ()> = HashMap::new();
    let mut finished_at: Vec<i64> = Vec::new();
    for l in &outputs {
        let id = l["custom_id"].as_str().unwrap_or_default().to_string();
        seen.insert(id.clone(), ());
        let body = &l["response"]["body"];
        let u = &body["usage"];
        let (p, c) = (
            u["prompt_tokens"].as_u64().unwrap_or(0),
            u["completion_tokens"].as_u64().unwrap_or(0),
        );
        prompt += p;
        completion += c;
        match u["prompt_tokens_details"]["cached_tokens"].as_u64() {
            Some(n) => {
                cached += n;
                cached_reported += 1;
            }
            None => cached_unreported += 1,
        }
        let text = answer_text(body).unwrap_or_default();
        let parsed = parse_answer(text);
        match (&parsed, &args.field) {
            (None, _) => unparsed.push((id.clone(), text.chars().take(80).collect())),
            (Some(Parsed::Number(n)), Some(_)) => numbers.push(*n),
            (Some(Parsed::Object(m)), Some(f)) => match m.get(f) {
                Some(Value::Number(n)) => numbers.extend(n.as_f64()),
                Some(Value::String(s)) => match s.trim().parse::<f64>() {
                    Ok(n) if n.is_finite() => numbers.push(n),
                    _ => *categories.entry(s.trim().to_string()).or_default() += 1,
                },
                Some(Value::Bool(b)) => *categories.entry(b.to_string()).or_default() += 1,
                _ => missing_field += 1,
            },
            (Some(_), None) => {}
        }
        if let Some(t) = body["created"].as_i64() {
            finished_at.push(t);
        }
        rows.push((id, parsed, "succeeded", String::new(), p, c));
    }
    for l in &errors {
        let id = l["custom_id"].as_str().unwrap_or_default().to_string();
        seen.insert(id.clone(), ());
        let code = error_code(l);
        *by_code.entry(code.clone()).or_default() += 1;
        if code == "invalid_answer" {
            let m: String = l["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(160)
                .collect();
            invalid.push((id.clone(), m));
        }
        rows.push((id, None, "failed", code, 0, 0));
    }
    let mut not_run = 0usize;
    if let Some(input) = &args.input {
        for l in read_jsonl(input)? {
            if let Some(id) = l["custom_id"].as_str()
                && !seen.contains_key(id)
            {
                not_run += 1;
            }
        }
    }
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(|e| e.to_string());
    w(
        out,
        format!(
            "lines: {} ({} succeeded, {} failed{})",
            outputs.len() + errors.len(),
            outputs.len(),
            errors.len(),
            if args.input.is_some() {
                format!(", {not_run} not run")
            } else {
                String::new()
            }
        ),
    )?;
    for (code, n) in &by_code {
        let hint = match code.as_str() {
            "invalid_answer" => {
                " (the answer never matched the line's JSON schema, re-asks included; the error file holds the last answer and what was wrong)"
            }
            "answer_truncated" => " (cut off at max_tokens: raise it and retry these lines)",
            _ => "",
        };
        w(out, format!("  failed {code}: {n}{hint}"))?;
    }
    // What the validator said of the first few answers that never validated.
    for (id, message) in invalid.iter().take(3) {
        w(out, format!("    {id}: {message}"))?;
    }
    let share = if cached_unreported == 0 && prompt > 0 {
        format!("{:.1}%", 100.0 * cached as f64 / prompt as f64)
    } else if cached_reported == 0 {
        "unknown (the backend did not report cached tokens)".into()
    } else {
        format!(
            "unknown ({cached_unreported} answers did not report; {cached} cached over the {cached_reported} that did)"
        )
    };
    w(
        out,
        format!("tokens: {prompt} prompt, {completion} completion; cached share {share}"),
    )?;
    w(
        out,
        format!("answers that did not parse: {}", unparsed.len()),
    )?;
    for (id, text) in unparsed.iter().take(5) {
        w(out, format!("  {id}: {text:?}"))?;
    }
    if let Some(f) = &args.field {
        w(
            out,
            format!(
                "field '{f}': {} numbers, {} categories, {missing_field} answers without it",
                numbers.len(),
                categories.values().sum::<usize>()
            ),
        )?;
        if let Some(s) = stats(&numbers) {
            w(
                out,
                format!(
                    "  count {} min {} max {} mean {:.3} median {} p10 {} p25 {} p75 {} p90 {}",
                    s.count, s.min, s.max, s.mean, s.median, s.p10, s.p25, s.p75, s.p90
                ),
            )?;
            // A text histogram: a bar per integer (scores), else over 10 equal bins.
            let integers = integer_valued(&numbers, &s);
            let bins = bins(&numbers, &s);
            let top = bins.iter().map(|b| b.2).max().unwrap_or(1).max(1);
            for (lo, hi, c) in &bins {
                let label = if integers {
                    format!("{:>10}", ((lo + hi) / 2.0) as i64)
                } else {
                    format!("{lo:>10.2}")
                };
                w(
                    out,
                    format!("  {label} {:>7} {}", c, "#".repeat(c * 40 / top)),
                )?;
            }
        }
        for (cat, n) in &categories {
            w(out, format!("  {cat}: {n}"))?;
        }
    }
    if let Some(path) = &args.plot {
        let data = super::plot::PlotData {
            field: args.field.as_deref(),
            bins: stats(&numbers)
                .map(|s| bins(&numbers, &s))
                .unwrap_or_default(),
            categories: categories.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            finished_at,
        };
        let drew = super::plot::draw(path, &data)?;
        w(out, format!("plot: {drew} in {}", path.display()))?;
    }
    if let Some(path) = &args.csv {
        let mut keys: BTreeSet<String> = BTreeSet::new();
        for (_, p, ..) in &rows {
            if let Some(Parsed::Object(m)) = p {
                keys.extend(m.keys().cloned());
            }
        }
        let any_number = rows
            .iter()
            .any(|(_, p, ..)| matches!(p, Some(Parsed::Number(_))));
        let file = std::fs::File::create(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let mut cw = csv::Writer::from_writer(std::io::BufWriter::new(file));
        let mut header = vec!["custom_id".to_string()];
        if any_number {
            header.push("value".into());
        }
        header.extend(keys.iter().cloned());
        header.extend(["status", "error", "prompt_tokens", "completion_tokens"].map(String::from));
        let err = |e: csv::Error| format!("cannot write {}: {e}", path.display());
        cw.write_record(&header).map_err(err)?;
        for (id, p, status, error, pt, ct) in &rows {
            let mut rec = vec![id.clone()];
            if any_number {
                rec.push(match p {
                    Some(Parsed::Number(n)) => n.to_string(),
                    _ => String::new(),
                });
            }
            for k in &keys {
                rec.push(match p {
                    Some(Parsed::Object(m)) => m.get(k).map(cell).unwrap_or_default(),
                    _ => String::new(),
                });
            }
            rec.extend([
                status.to_string(),
                error.clone(),
                pt.to_string(),
                ct.to_string(),
            ]);
            cw.write_record(&rec).map_err(err)?;
        }
        cw.flush()
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        w(
            out,
            format!("wrote {} rows to {}", rows.len(), path.display()),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_as_json_fenced_json_or_numbers() {
        assert_eq!(parse_answer(" 7.5 "), Some(Parsed::Number(7.5)));
        let fenced = "Here you go:\n```json\n{\"score\": 8, \"verdict\": \"Yes\"}\n```";
        let Some(Parsed::Object(m)) = parse_answer(fenced) else {
            panic!("fenced")
        };
        assert_eq!(m["score"], 8);
        let Some(Parsed::Object(m)) = parse_answer("{\"score\": 3}") else {
            panic!("plain")
        };
        assert_eq!(m["score"], 3);
        assert_eq!(parse_answer("I think it's good"), None);
        assert_eq!(parse_answer("NaN"), None);
    }

    #[test]
    fn integer_answers_get_a_bar_per_integer() {
        let scores = [1.0, 2.0, 2.0, 7.0, 10.0, 10.0, 10.0];
        let s = stats(&scores).expect("stats");
        let b = bins(&scores, &s);
        assert_eq!(b.len(), 10, "1 to 10: ten bars, not 1.0, 1.9, 2.8, …");
        let counts: Vec<usize> = b.iter().map(|x| x.2).collect();
        assert_eq!(counts, vec![1, 2, 0, 0, 0, 0, 1, 0, 0, 3]);
        assert_eq!((b[0].0, b[0].1), (0.5, 1.5));
        // Fractions, or integers over a wide range, keep 10 equal bins.
        let f = [0.5, 1.0, 9.75];
        assert_eq!(bins(&f, &stats(&f).expect("stats")).len(), 10);
        let wide = [0.0, 1000.0];
        assert_eq!(bins(&wide, &stats(&wide).expect("stats")).len(), 10);
        let one = [5.0, 5.0];
        assert_eq!(
            bins(&one, &stats(&one).expect("stats")),
            vec![(4.5, 5.5, 2)]
        );
    }

    #[test]
    fn statistics_by_hand() {
        let s = stats(&[4.0, 1.0, 3.0, 2.0]).expect("stats");
        assert_eq!((s.min, s.max, s.mean, s.median), (1.0, 4.0, 2.5, 2.5));
        assert_eq!((s.p25, s.p75), (1.0, 3.0));
        assert!(stats(&[]).is_none());
    }
}
