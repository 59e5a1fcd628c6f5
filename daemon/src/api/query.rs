//! Query-string handling for the data plane: our own parser (clients send
//! raw `|`, `{`, `}` that strict parsers reject), identifier rules and
//! api-version generations.

/// The two generations of the data-plane API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// `code/execute`, `files/upload`, `files/content/{name}`.
    One,
    /// `executions`, `files/{name}/content`, `session`.
    Two,
}

pub const API_VERSIONS: &[(&str, Generation)] = &[
    ("2024-02-02-preview", Generation::One),
    ("2024-08-02-preview", Generation::One),
    ("2024-10-02-preview", Generation::Two),
    ("2025-02-02-preview", Generation::Two),
    ("2025-10-02-preview", Generation::Two),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiVersion {
    pub name: &'static str,
    pub generation: Generation,
}

pub fn parse_api_version(raw: Option<&str>) -> Result<ApiVersion, String> {
    let supported = || {
        API_VERSIONS
            .iter()
            .map(|(v, _)| *v)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(v) = raw else {
        return Err(format!(
            "the query parameter 'api-version' is required; supported versions: {}",
            supported()
        ));
    };
    API_VERSIONS
        .iter()
        .find(|(name, _)| *name == v.trim())
        .map(|(name, generation)| ApiVersion {
            name,
            generation: *generation,
        })
        .ok_or_else(|| {
            format!(
                "api-version {v:?} is not supported; supported versions: {}",
                supported()
            )
        })
}

pub const IDENTIFIER_MIN: usize = 4;
pub const IDENTIFIER_MAX: usize = 128;
const IDENTIFIER_PUNCT: &str = "|-&^%$#(){}[];<>_:\"'?/.,@*+=!~`";

pub fn validate_identifier(raw: Option<&str>) -> Result<String, String> {
    let Some(id) = raw else {
        return Err("the query parameter 'identifier' is required: it names the session (4 to 128 characters)".into());
    };
    let n = id.chars().count();
    if n < IDENTIFIER_MIN {
        return Err(format!(
            "identifier {id:?} is too short: it has {n} characters, at least {IDENTIFIER_MIN} are required"
        ));
    }
    if n > IDENTIFIER_MAX {
        return Err(format!(
            "identifier is too long: it has {n} characters, at most {IDENTIFIER_MAX} are allowed"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || IDENTIFIER_PUNCT.contains(*c)))
    {
        return Err(format!(
            "identifier contains the character {c:?}, which is not allowed; use letters, digits and {IDENTIFIER_PUNCT}"
        ));
    }
    Ok(id.to_string())
}

/// Decodes `%XX` escapes; a `+` stays a `+` (it is a legal identifier
/// character and no client means a space by it here).
pub fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                // A bare `%` is a legal identifier character: keep it.
                None => out.push(b'%'),
            }
        } else {
            out.push(b[i]);
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8 text"))
}

/// Query parameters in order; values that fail to decode carry the error.
pub struct Query {
    pairs: Vec<(String, Result<String, String>)>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Query {
        let pairs = raw
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                let key = percent_decode(k).unwrap_or_else(|_| k.to_string());
                (key, percent_decode(v))
            })
            .collect();
        Query { pairs }
    }

    /// First value of `key` (case-insensitive key match).
    pub fn get(&self, key: &str) -> Option<Result<&str, &str>> {
        self.pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_deref().map_err(String::as_str))
    }

    /// A parameter's decoded value, or a validation message.
    pub fn text(&self, key: &str) -> Result<Option<&str>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Ok(v)) => Ok(Some(v)),
            Some(Err(e)) => Err(format!("query parameter {key:?}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_of_both_generations() {
        assert_eq!(
            parse_api_version(Some("2024-02-02-preview"))
                .unwrap()
                .generation,
            Generation::One
        );
        assert_eq!(
            parse_api_version(Some("2025-10-02-preview"))
                .unwrap()
                .generation,
            Generation::Two
        );
        let e = parse_api_version(Some("2023-01-01")).unwrap_err();
        assert!(
            e.contains("not supported") && e.contains("2024-10-02-preview"),
            "{e}"
        );
        assert!(parse_api_version(None).unwrap_err().contains("required"));
    }

    #[test]
    fn identifier_rules() {
        assert!(validate_identifier(Some("abcd")).is_ok());
        assert!(validate_identifier(Some("a|b{c}[d]~`'\"?/.,@*+=!;<>:_$#^&%()")).is_ok());
        let e = validate_identifier(Some("abc")).unwrap_err();
        assert!(e.contains("too short"), "{e}");
        let e = validate_identifier(Some(&"a".repeat(129))).unwrap_err();
        assert!(e.contains("too long"), "{e}");
        assert!(validate_identifier(Some(&"a".repeat(128))).is_ok());
        let e = validate_identifier(Some("has space")).unwrap_err();
        assert!(e.contains("' '"), "{e}");
        assert!(validate_identifier(Some("naïve-id")).is_err());
        assert!(validate_identifier(Some("tab\tid")).is_err());
        assert!(validate_identifier(None).unwrap_err().contains("required"));
    }

    #[test]
    fn raw_and_encoded_queries() {
        let q = Query::parse(Some("identifier=a%7Cb%20c&api-version=2024-02-02-preview"));
        assert_eq!(q.get("identifier"), Some(Ok("a|b c")));
        let q = Query::parse(Some("identifier=a|b{c}&x"));
        assert_eq!(q.get("identifier"), Some(Ok("a|b{c}")));
        assert_eq!(q.get("x"), Some(Ok("")));
        let q = Query::parse(Some("identifier=100%&api-version=1"));
        assert_eq!(q.get("identifier"), Some(Ok("100%")));
        let q = Query::parse(Some("identifier=a+b%2B"));
        assert_eq!(q.get("identifier"), Some(Ok("a+b+")));
        let q = Query::parse(Some("identifier=%FF%FE"));
        assert!(q.text("identifier").is_err());
        assert!(Query::parse(None).get("identifier").is_none());
    }
}
