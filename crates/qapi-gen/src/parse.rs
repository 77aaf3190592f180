//! The QAPI schema language's surface syntax: Python-style literals.
//!
//! A schema file is a sequence of top-level objects (`{ ... }`) made of
//! single-quoted strings, `true`/`false`, lists and objects. `#` starts a
//! comment that runs to the end of the line. A block that starts with a line
//! `##` and ends with a line `##` is a doc comment; it is kept and attached to
//! the expression that follows it.

use std::fmt;

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `'text'`
    Str(String),
    /// `true` or `false`
    Bool(bool),
    /// `[ ... ]`
    List(Vec<Value>),
    /// `{ 'key': value, ... }`, in source order.
    Dict(Vec<(String, Value)>),
}

impl Value {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The member `key` of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(d) => d.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// A top-level expression with the doc comment right before it.
#[derive(Debug, Clone)]
pub struct Expr {
    /// The expression.
    pub value: Value,
    /// The doc comment's lines, without their leading `#` and one space.
    pub doc: Option<Vec<String>>,
    /// The 1-based line where the expression starts.
    pub line: usize,
}

/// A syntax error with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Punct(char),
    Str(String),
    Bool(bool),
    Doc(Vec<String>),
    Eof,
}

struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Lexer<'a> {
    fn err<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            line: self.line,
            message: message.into(),
        })
    }

    fn rest_of_line(&mut self) -> &'a str {
        let start = self.pos;
        while self.pos < self.src.len() && self.src[self.pos] != b'\n' {
            self.pos += 1;
        }
        std::str::from_utf8(&self.src[start..self.pos]).unwrap_or("")
    }

    /// Reads a doc block; `self.pos` is at the first `#` of its opening `##`.
    fn doc_block(&mut self) -> Result<Tok, ParseError> {
        let opening = self.rest_of_line();
        if opening.trim_end() != "##" {
            return self.err("a doc comment must start with a line '##'");
        }
        let mut lines = Vec::new();
        loop {
            if self.pos >= self.src.len() {
                return self.err("unterminated doc comment");
            }
            self.pos += 1; // the newline
            self.line += 1;
            while self.pos < self.src.len() && matches!(self.src[self.pos], b' ' | b'\t') {
                self.pos += 1;
            }
            if self.pos >= self.src.len() || self.src[self.pos] != b'#' {
                return self.err("a doc comment line must start with '#'");
            }
            let text = self.rest_of_line();
            if text.trim_end() == "##" {
                return Ok(Tok::Doc(lines));
            }
            let text = &text[1..];
            let text = text.strip_prefix(' ').unwrap_or(text);
            lines.push(text.trim_end().to_owned());
        }
    }

    fn next(&mut self) -> Result<(Tok, usize), ParseError> {
        loop {
            let Some(&c) = self.src.get(self.pos) else {
                return Ok((Tok::Eof, self.line));
            };
            let line = self.line;
            match c {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'#' => {
                    if self.src.get(self.pos + 1) == Some(&b'#') {
                        return Ok((self.doc_block()?, line));
                    }
                    self.rest_of_line();
                }
                b'{' | b'}' | b'[' | b']' | b':' | b',' => {
                    self.pos += 1;
                    return Ok((Tok::Punct(c as char), line));
                }
                b'\'' => {
                    self.pos += 1;
                    let mut s = String::new();
                    loop {
                        let Some(&ch) = self.src.get(self.pos) else {
                            return self.err("missing terminating \"'\"");
                        };
                        self.pos += 1;
                        match ch {
                            b'\n' => return self.err("missing terminating \"'\""),
                            b'\'' => break,
                            b'\\' => match self.src.get(self.pos) {
                                Some(b'\\') => {
                                    self.pos += 1;
                                    s.push('\\');
                                }
                                _ => return self.err("unknown escape in string"),
                            },
                            32..=126 => s.push(ch as char),
                            _ => return self.err("funny character in string"),
                        }
                    }
                    return Ok((Tok::Str(s), line));
                }
                _ if self.src[self.pos..].starts_with(b"true") => {
                    self.pos += 4;
                    return Ok((Tok::Bool(true), line));
                }
                _ if self.src[self.pos..].starts_with(b"false") => {
                    self.pos += 5;
                    return Ok((Tok::Bool(false), line));
                }
                _ => return self.err(format!("stray character {:?}", c as char)),
            }
        }
    }
}

struct Parser<'a> {
    lexer: Lexer<'a>,
    tok: Tok,
    line: usize,
}

impl<'a> Parser<'a> {
    fn advance(&mut self) -> Result<(), ParseError> {
        let (tok, line) = self.lexer.next()?;
        self.tok = tok;
        self.line = line;
        Ok(())
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            line: self.line,
            message: message.into(),
        })
    }

    fn expect(&mut self, c: char) -> Result<(), ParseError> {
        if self.tok != Tok::Punct(c) {
            return self.err(format!("expected '{c}', found {:?}", self.tok));
        }
        self.advance()
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        match std::mem::replace(&mut self.tok, Tok::Eof) {
            Tok::Str(s) => {
                self.advance()?;
                Ok(Value::Str(s))
            }
            Tok::Bool(b) => {
                self.advance()?;
                Ok(Value::Bool(b))
            }
            Tok::Punct('[') => {
                self.advance()?;
                let mut items = Vec::new();
                if self.tok == Tok::Punct(']') {
                    self.advance()?;
                    return Ok(Value::List(items));
                }
                loop {
                    items.push(self.value()?);
                    match self.tok {
                        Tok::Punct(',') => self.advance()?,
                        Tok::Punct(']') => {
                            self.advance()?;
                            return Ok(Value::List(items));
                        }
                        _ => return self.err("expected ',' or ']'"),
                    }
                }
            }
            Tok::Punct('{') => {
                self.advance()?;
                let mut members: Vec<(String, Value)> = Vec::new();
                if self.tok == Tok::Punct('}') {
                    self.advance()?;
                    return Ok(Value::Dict(members));
                }
                loop {
                    let Tok::Str(key) = std::mem::replace(&mut self.tok, Tok::Eof) else {
                        return self.err("expected a string key");
                    };
                    self.advance()?;
                    self.expect(':')?;
                    if members.iter().any(|(k, _)| *k == key) {
                        return self.err(format!("duplicate key '{key}'"));
                    }
                    let v = self.value()?;
                    members.push((key, v));
                    match self.tok {
                        Tok::Punct(',') => self.advance()?,
                        Tok::Punct('}') => {
                            self.advance()?;
                            return Ok(Value::Dict(members));
                        }
                        _ => return self.err("expected ',' or '}'"),
                    }
                }
            }
            Tok::Doc(_) => self.err("a doc comment inside an expression"),
            other => {
                self.tok = other;
                self.err(format!("expected a value, found {:?}", self.tok))
            }
        }
    }
}

/// Parses one schema file's text into its top-level expressions.
///
/// A doc comment is attached to the expression that directly follows it;
/// one followed by another doc comment (or by nothing) is free-form text
/// and dropped.
pub fn parse(src: &str) -> Result<Vec<Expr>, ParseError> {
    let mut p = Parser {
        lexer: Lexer {
            src: src.as_bytes(),
            pos: 0,
            line: 1,
        },
        tok: Tok::Eof,
        line: 1,
    };
    p.advance()?;
    let mut out = Vec::new();
    let mut doc = None;
    loop {
        match std::mem::replace(&mut p.tok, Tok::Eof) {
            Tok::Eof => return Ok(out),
            Tok::Doc(lines) => {
                doc = Some(lines);
                p.advance()?;
            }
            tok @ Tok::Punct('{') => {
                p.tok = tok;
                let line = p.line;
                let value = p.value()?;
                out.push(Expr {
                    value,
                    doc: doc.take(),
                    line,
                });
            }
            other => {
                p.tok = other;
                return p.err(format!("expected '{{' at top level, found {:?}", p.tok));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.into())
    }

    #[test]
    fn literals_comments_and_docs() {
        let src = "# a comment\n\
                   ##\n# = Section\n##\n\
                   ##\n# @Foo:\n#\n# Since: 1.2\n##\n\
                   { 'struct': 'Foo', # trailing comment\n  'data': { 'a': 'int', '*b': ['str'] }, 'x': true }\n\
                   { 'include': 'x\\\\y.json' }\n";
        let exprs = parse(src).unwrap();
        assert_eq!(exprs.len(), 2);
        assert_eq!(
            exprs[0].doc.as_deref(),
            Some(&["@Foo:".to_owned(), "".into(), "Since: 1.2".into()][..])
        );
        assert_eq!(exprs[0].line, 10);
        assert_eq!(exprs[0].value.get("struct"), Some(&s("Foo")));
        assert_eq!(
            exprs[0].value.get("data"),
            Some(&Value::Dict(vec![
                ("a".into(), s("int")),
                ("*b".into(), Value::List(vec![s("str")]))
            ]))
        );
        assert_eq!(exprs[0].value.get("x"), Some(&Value::Bool(true)));
        assert_eq!(exprs[1].doc, None);
        assert_eq!(exprs[1].value.get("include"), Some(&s("x\\y.json")));
    }

    #[test]
    fn errors_have_lines() {
        let e = parse("{ 'a': 'b' }\n{ 'a' 'b' }").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(parse("{ 'a': \"b\" }").is_err());
        assert!(parse("{ 'a': 'b\\n' }").is_err());
        assert!(parse("{ 'a': 'b', 'a': 'c' }").is_err());
        assert!(parse("##\n# unterminated\n").is_err());
        assert!(parse("[ 'top-level list' ]").is_err());
    }
}
