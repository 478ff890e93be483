//! `$filter` on list routes, in the OData style of the MIM REST APIs: comparisons joined by
//! `and`, e.g. `status eq 'failed' and created_at ge datetime'2026-11-01T00:00:00Z'`.
//!
//! A plain parser over the text (no I/O), with every error pointing at a position, and an
//! evaluator over the JSON object a list item serialises to; both are table-tested.

use serde_json::Value;
use thiserror::Error;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Longest filter accepted: far beyond any real one, and it bounds the work per request.
pub const MAX_LENGTH: usize = 2048;
/// Most comparisons in one filter.
const MAX_TERMS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Text(String),
    DateTime(OffsetDateTime),
    Number(f64),
    Bool(bool),
}

/// One `field op literal`; `field` is a path such as `reconciliation/verdict`.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub field: Vec<String>,
    pub op: Op,
    pub value: Literal,
}

/// A parsed filter: every comparison must hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    pub terms: Vec<Comparison>,
}

/// What is wrong with a filter, and where (a 0-based character position).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{what} at position {at}")]
pub struct FilterError {
    pub what: String,
    pub at: usize,
}

fn fail<T>(what: impl Into<String>, at: usize) -> Result<T, FilterError> {
    Err(FilterError {
        what: what.into(),
        at,
    })
}

impl Filter {
    /// Parses `text`; `fields` are the paths the list's items have (`a/b` for nested ones).
    pub fn parse(text: &str, fields: &[&str]) -> Result<Filter, FilterError> {
        if text.chars().count() > MAX_LENGTH {
            return fail(
                format!("the filter is longer than {MAX_LENGTH} characters"),
                MAX_LENGTH,
            );
        }
        let mut p = Parser {
            chars: text.chars().collect(),
            at: 0,
        };
        let mut terms = vec![p.comparison(fields)?];
        loop {
            p.skip_spaces();
            if p.at == p.chars.len() {
                return Ok(Filter { terms });
            }
            let at = p.at;
            if p.word().as_deref() != Some("and") {
                return fail("expected `and` or the end of the filter", at);
            }
            if terms.len() == MAX_TERMS {
                return fail(format!("more than {MAX_TERMS} comparisons"), at);
            }
            terms.push(p.comparison(fields)?);
        }
    }

    /// Whether `item` (a list item as its JSON) satisfies every comparison. A missing or null
    /// field satisfies only `ne`.
    pub fn matches(&self, item: &Value) -> bool {
        self.terms.iter().all(|t| t.holds(item))
    }
}

impl Comparison {
    fn holds(&self, item: &Value) -> bool {
        let mut value = item;
        for step in &self.field {
            value = &value[step.as_str()];
        }
        let ordering = match (&self.value, value) {
            (Literal::Text(want), Value::String(have)) => have.as_str().cmp(want.as_str()),
            (Literal::DateTime(want), Value::String(have)) => {
                match OffsetDateTime::parse(have, &Rfc3339) {
                    Ok(have) => have.cmp(want),
                    Err(_) => return false,
                }
            }
            (Literal::Number(want), Value::Number(have)) => {
                match have.as_f64().and_then(|h| h.partial_cmp(want)) {
                    Some(ordering) => ordering,
                    None => return false,
                }
            }
            (Literal::Bool(want), Value::Bool(have)) => have.cmp(want),
            _ => return self.op == Op::Ne,
        };
        use std::cmp::Ordering::*;
        match self.op {
            Op::Eq => ordering == Equal,
            Op::Ne => ordering != Equal,
            Op::Gt => ordering == Greater,
            Op::Lt => ordering == Less,
            Op::Ge => ordering != Less,
            Op::Le => ordering != Greater,
        }
    }
}

struct Parser {
    chars: Vec<char>,
    at: usize,
}

impl Parser {
    fn skip_spaces(&mut self) {
        while self.chars.get(self.at).is_some_and(|c| *c == ' ') {
            self.at += 1;
        }
    }

    /// A run of letters, digits, `_` and `/` (a field, an operator, a keyword).
    fn word(&mut self) -> Option<String> {
        self.skip_spaces();
        let start = self.at;
        while self
            .chars
            .get(self.at)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '/')
        {
            self.at += 1;
        }
        (self.at > start).then(|| self.chars[start..self.at].iter().collect())
    }

    fn comparison(&mut self, fields: &[&str]) -> Result<Comparison, FilterError> {
        self.skip_spaces();
        let at = self.at;
        let Some(field) = self.word() else {
            return fail("expected a field name", at);
        };
        if !fields.contains(&field.as_str()) {
            return fail(
                format!("unknown field `{field}` (known: {})", fields.join(", ")),
                at,
            );
        }
        self.skip_spaces();
        let op_at = self.at;
        let op = match self.word().as_deref() {
            Some("eq") => Op::Eq,
            Some("ne") => Op::Ne,
            Some("gt") => Op::Gt,
            Some("lt") => Op::Lt,
            Some("ge") => Op::Ge,
            Some("le") => Op::Le,
            _ => return fail("expected an operator (eq, ne, gt, lt, ge, le)", op_at),
        };
        let value = self.literal()?;
        if matches!(value, Literal::Bool(_)) && !matches!(op, Op::Eq | Op::Ne) {
            return fail("true and false compare only with eq and ne", op_at);
        }
        Ok(Comparison {
            field: field.split('/').map(str::to_string).collect(),
            op,
            value,
        })
    }

    fn literal(&mut self) -> Result<Literal, FilterError> {
        self.skip_spaces();
        let at = self.at;
        match self.chars.get(at) {
            Some('\'') => self.quoted().map(Literal::Text),
            Some(c) if c.is_ascii_digit() || *c == '-' => self.number(),
            Some(_) => match self.word().as_deref() {
                Some("true") => Ok(Literal::Bool(true)),
                Some("false") => Ok(Literal::Bool(false)),
                Some("datetime") if self.chars.get(self.at) == Some(&'\'') => {
                    let text_at = self.at;
                    let text = self.quoted()?;
                    OffsetDateTime::parse(&text, &Rfc3339)
                        .map(Literal::DateTime)
                        .or_else(|_| fail("not an RFC 3339 date and time", text_at))
                }
                _ => fail(
                    "expected a value: 'text', datetime'…', a number, true or false",
                    at,
                ),
            },
            None => fail("expected a value", at),
        }
    }

    /// `'…'`, with `''` standing for one quote.
    fn quoted(&mut self) -> Result<String, FilterError> {
        let start = self.at;
        self.at += 1;
        let mut text = String::new();
        loop {
            match self.chars.get(self.at) {
                None => return fail("unterminated string", start),
                Some('\'') if self.chars.get(self.at + 1) == Some(&'\'') => {
                    text.push('\'');
                    self.at += 2;
                }
                Some('\'') => {
                    self.at += 1;
                    return Ok(text);
                }
                Some(c) => {
                    text.push(*c);
                    self.at += 1;
                }
            }
        }
    }

    fn number(&mut self) -> Result<Literal, FilterError> {
        let start = self.at;
        while self
            .chars
            .get(self.at)
            .is_some_and(|c| c.is_ascii_digit() || matches!(c, '-' | '.' | 'e' | 'E' | '+'))
        {
            self.at += 1;
        }
        let text: String = self.chars[start..self.at].iter().collect();
        match text.parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(Literal::Number(n)),
            _ => fail(format!("`{text}` is not a number"), start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIELDS: &[&str] = &[
        "status",
        "id",
        "created_at",
        "reconciliation/verdict",
        "done",
    ];

    fn item() -> Value {
        json!({"status": "failed", "id": 7, "created_at": "2026-11-20T10:00:00Z",
               "reconciliation": {"verdict": "critical"}, "done": false, "note": null})
    }

    #[test]
    fn good_filters_and_what_they_match() {
        let rows: [(&str, bool); 15] = [
            ("status eq 'failed'", true),
            ("status ne 'failed'", false),
            ("id eq 7", true),
            ("id gt 6.5 and id lt 8", true),
            ("id ge 8", false),
            ("id le 7", true),
            ("created_at ge datetime'2026-11-01T00:00:00Z'", true),
            ("created_at lt datetime'2026-11-20T10:00:00+01:00'", false),
            ("reconciliation/verdict eq 'critical'", true),
            ("done eq false", true),
            ("done ne true", true),
            ("status gt 'e' and status lt 'g'", true),
            ("  status   eq   'failed'  ", true),
            ("status eq 'it''s'", false),
            (
                "status eq 'failed' and reconciliation/verdict eq 'ok'",
                false,
            ),
        ];
        for (text, expected) in rows {
            let filter = Filter::parse(text, FIELDS).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(filter.matches(&item()), expected, "{text}");
        }
        let quoted = Filter::parse("status eq 'it''s'", FIELDS).unwrap();
        assert_eq!(quoted.terms[0].value, Literal::Text("it's".into()));
    }

    #[test]
    fn a_missing_field_matches_only_ne() {
        let item = json!({"id": 1});
        assert!(!Filter::parse("status eq 'x'", FIELDS)
            .unwrap()
            .matches(&item));
        assert!(Filter::parse("status ne 'x'", FIELDS)
            .unwrap()
            .matches(&item));
        // A text compared with a number is a mismatch, not an error.
        assert!(!Filter::parse("id eq '1'", FIELDS).unwrap().matches(&item));
    }

    #[test]
    fn bad_filters_say_what_and_where() {
        let rows: [(&str, &str, usize); 12] = [
            ("", "expected a field name", 0),
            ("colour eq 'red'", "unknown field `colour`", 0),
            ("status", "expected an operator", 6),
            ("status like 'x'", "expected an operator", 7),
            ("status eq", "expected a value", 9),
            ("status eq red", "expected a value", 10),
            ("status eq 'red", "unterminated string", 10),
            ("status eq 'a' or id eq 1", "expected `and`", 14),
            ("id eq 1.2.3", "is not a number", 6),
            ("created_at ge datetime'yesterday'", "not an RFC 3339", 22),
            ("done gt true", "compare only with eq and ne", 5),
            ("status eq 'a' and", "expected a field name", 17),
        ];
        for (text, what, at) in rows {
            let e = Filter::parse(text, FIELDS).expect_err(text);
            assert!(e.what.contains(what), "{text}: {e}");
            assert_eq!(e.at, at, "{text}: {e}");
        }
        assert!(Filter::parse(&"x".repeat(MAX_LENGTH + 1), FIELDS).is_err());
        let many = vec!["id eq 1"; MAX_TERMS + 1].join(" and ");
        assert!(Filter::parse(&many, FIELDS).is_err_and(|e| e.what.contains("comparisons")));
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(text in ".{0,200}") {
            let _ = Filter::parse(&text, FIELDS);
        }

        #[test]
        fn parsing_never_panics_on_near_misses(
            parts in proptest::collection::vec(
                proptest::sample::select(vec!["status", "id", " ", "eq", "and", "'", "''", "datetime'", "1", "-", ".", "e", "true", "/", "reconciliation/verdict", "2026-11-01T00:00:00Z"]),
                0..20,
            )
        ) {
            if let Ok(f) = Filter::parse(&parts.concat(), FIELDS) {
                let _ = f.matches(&item());
            }
        }
    }
}
