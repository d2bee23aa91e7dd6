//! A strict reader of the Varlink interface definition language (varlink.org, "Interface
//! Definition"), for tests: the descriptions this crate serves must be valid for every client,
//! not only for ours. The reference implementation (Python `varlink`) is run against them by the
//! end-to-end test `tests/varlink_python.rs`; this one needs no Python and names the rule broken.
//!
//! Checked: the interface name; member names (`[A-Z][A-Za-z0-9]*`), unique; field and enum
//! value names (`[A-Za-z](_?[A-Za-z0-9])*`), unique within their struct or enum; types (`bool`,
//! `int`, `float`, `string`, `object`, `[]T`, `[string]T`, `?T` but not `??T`, anonymous
//! structs and enums, and references to types the interface defines); `method N(...) ->
//! (...)`, `error N (...)`, `type N (...)`. Comments run from `#` to the end of the line.

use std::collections::HashSet;

/// Checks `description`; on success returns the member names in order.
pub fn check(description: &str) -> Result<Vec<String>, String> {
    let mut reader = Reader {
        text: description,
        pos: 0,
    };
    reader.skip();
    reader.keyword("interface")?;
    let name = reader.word();
    if !is_interface_name(name) {
        return Err(format!("`{name}` is not a valid interface name"));
    }
    let mut members = Vec::new();
    let mut references = Vec::new();
    reader.skip();
    while !reader.at_end() {
        let kind = reader.word().to_string();
        let name = reader.word().to_string();
        if !is_member_name(&name) {
            return Err(format!(
                "{kind} `{name}`: a member name is [A-Z][A-Za-z0-9]*"
            ));
        }
        let context = format!("{kind} {name}");
        match kind.as_str() {
            "type" => reader.struct_or_enum(&context, &mut references)?,
            "error" => reader.fields(&context, &mut references)?,
            "method" => {
                reader.fields(&context, &mut references)?;
                reader.punct("->", &context)?;
                reader.fields(&context, &mut references)?;
            }
            other => {
                return Err(format!(
                    "`{other}` where a member (type, method, error) was expected"
                ))
            }
        }
        if members.contains(&name) {
            return Err(format!("{context}: defined twice"));
        }
        members.push(name);
    }
    for (context, reference) in references {
        if !members.contains(&reference) {
            return Err(format!("{context}: type `{reference}` is not defined"));
        }
    }
    Ok(members)
}

struct Reader<'a> {
    text: &'a str,
    pos: usize,
}

impl Reader<'_> {
    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos == self.text.len()
    }

    /// Skips whitespace and comments.
    fn skip(&mut self) {
        loop {
            let rest = self.rest();
            let trimmed = rest.trim_start_matches([' ', '\t', '\n', '\r']);
            self.pos += rest.len() - trimmed.len();
            if self.rest().starts_with('#') {
                self.pos += self.rest().find('\n').unwrap_or(self.rest().len());
            } else {
                return;
            }
        }
    }

    /// The next word: everything up to whitespace or punctuation, then skips what follows.
    fn word(&mut self) -> &str {
        let start = self.pos;
        let len = self
            .rest()
            .find(|c: char| c.is_whitespace() || "(),:?[]#".contains(c))
            .unwrap_or(self.rest().len());
        // A `->` after a word is punctuation, never part of it.
        let len = self.rest()[..len].find("->").unwrap_or(len);
        self.pos += len;
        let word = &self.text[start..start + len];
        self.skip();
        word
    }

    fn keyword(&mut self, keyword: &str) -> Result<(), String> {
        let word = self.word();
        if word == keyword {
            Ok(())
        } else {
            Err(format!("expected `{keyword}`, found `{word}`"))
        }
    }

    fn punct(&mut self, punct: &str, context: &str) -> Result<(), String> {
        if self.rest().starts_with(punct) {
            self.pos += punct.len();
            self.skip();
            Ok(())
        } else {
            let found: String = self.rest().chars().take(20).collect();
            Err(format!("{context}: expected `{punct}` at `{found}`"))
        }
    }

    fn try_punct(&mut self, punct: &str) -> bool {
        self.punct(punct, "").is_ok()
    }

    /// `( name: type, ... )` or `( value, ... )`: decided by the first entry.
    fn struct_or_enum(
        &mut self,
        context: &str,
        references: &mut Vec<(String, String)>,
    ) -> Result<(), String> {
        let save = self.pos;
        self.punct("(", context)?;
        if self.try_punct(")") {
            self.pos = save;
            return self.fields(context, references);
        }
        self.word();
        let is_struct = self.rest().starts_with(':');
        self.pos = save;
        if is_struct {
            self.fields(context, references)
        } else {
            self.enum_values(context)
        }
    }

    fn fields(
        &mut self,
        context: &str,
        references: &mut Vec<(String, String)>,
    ) -> Result<(), String> {
        self.punct("(", context)?;
        let mut seen = HashSet::new();
        if self.try_punct(")") {
            return Ok(());
        }
        loop {
            let field = self.word().to_string();
            if !is_field_name(&field) {
                return Err(format!(
                    "{context}: field `{field}` is not a Varlink name ([A-Za-z](_?[A-Za-z0-9])*)"
                ));
            }
            if !seen.insert(field.clone()) {
                return Err(format!("{context}: field `{field}` appears twice"));
            }
            let context = format!("{context}.{field}");
            self.punct(":", &context)?;
            self.vtype(&context, references, false)?;
            if self.try_punct(")") {
                return Ok(());
            }
            self.punct(",", &context)?;
        }
    }

    fn enum_values(&mut self, context: &str) -> Result<(), String> {
        self.punct("(", context)?;
        let mut seen = HashSet::new();
        loop {
            let value = self.word().to_string();
            if !is_field_name(&value) {
                return Err(format!(
                    "{context}: enum value `{value}` is not a Varlink name \
                     ([A-Za-z](_?[A-Za-z0-9])*)"
                ));
            }
            if !seen.insert(value.clone()) {
                return Err(format!("{context}: enum value `{value}` appears twice"));
            }
            if self.try_punct(")") {
                return Ok(());
            }
            self.punct(",", context)?;
        }
    }

    fn vtype(
        &mut self,
        context: &str,
        references: &mut Vec<(String, String)>,
        after_maybe: bool,
    ) -> Result<(), String> {
        if self.try_punct("?") {
            if after_maybe {
                return Err(format!("{context}: `??` is not a type"));
            }
            return self.vtype(context, references, true);
        }
        if self.try_punct("[]") {
            return self.vtype(context, references, false);
        }
        if self.rest().starts_with("[string]") {
            self.pos += "[string]".len();
            self.skip();
            return self.vtype(context, references, false);
        }
        if self.rest().starts_with('(') {
            return self.struct_or_enum(context, references);
        }
        let word = self.word().to_string();
        match word.as_str() {
            "bool" | "int" | "float" | "string" | "object" => Ok(()),
            name if is_member_name(name) => {
                references.push((context.to_string(), word));
                Ok(())
            }
            other => Err(format!("{context}: `{other}` is not a type")),
        }
    }
}

/// `[A-Za-z](_?[A-Za-z0-9])*`: field names and enum values.
fn is_field_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_alphabetic)
        && !name.ends_with('_')
        && !name.contains("__")
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

/// `[A-Z][A-Za-z0-9]*`: types, methods, errors.
fn is_member_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_uppercase) && bytes.iter().all(u8::is_ascii_alphanumeric)
}

/// Reverse-domain name: dot-separated parts of letters, digits and inner dashes, at least two,
/// the first starting with a letter.
fn is_interface_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() >= 2
        && parts[0].starts_with(|c: char| c.is_ascii_alphabetic())
        && parts.iter().all(|part| {
            !part.is_empty()
                && !part.starts_with('-')
                && !part.ends_with('-')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_standard_service_interface() {
        let members = check(super::super::SERVICE_DESCRIPTION).unwrap();
        assert!(members.contains(&"GetInterfaceDescription".to_string()));
    }

    #[test]
    fn names_what_breaks_the_grammar() {
        let ok = "interface a.b\ntype T (x: ?[]string, e: (one, two_2))\nmethod M(t: T) -> ()\n";
        assert_eq!(check(ok).unwrap(), ["T", "M"]);
        for (bad, expected) in [
            (
                "interface a.b\ntype S (f: (vhd-fixed, raw))",
                "enum value `vhd-fixed`",
            ),
            ("interface a.b\ntype S (bad-name: int)", "field `bad-name`"),
            ("interface a.b\ntype S (f__g: int)", "field `f__g`"),
            ("interface a.b\ntype lower (f: int)", "member name"),
            (
                "interface a.b\nmethod M(x: Missing) -> ()",
                "`Missing` is not defined",
            ),
            ("interface a.b\nmethod M(x: ??int) -> ()", "`??`"),
            ("interface a.b\nmethod M(x: int)", "expected `->`"),
            (
                "interface a.b\nerror E (x: int)\nerror E (y: int)",
                "defined twice",
            ),
            ("interface a.b\ntype S (a: int, a: int)", "appears twice"),
            ("interface ab\ntype S (a: int)", "interface name"),
        ] {
            let error = check(bad).unwrap_err();
            assert!(error.contains(expected), "{bad:?}: {error}");
        }
    }
}
