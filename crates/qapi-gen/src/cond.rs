//! `'if'` conditions and the build profile they are evaluated against.
//!
//! QEMU compiles its schema with the C preprocessor symbols of one build
//! (`CONFIG_*` for configure options, `TARGET_*` for the emulated target,
//! `HAVE_*` for host features). The generator decides each condition once,
//! against a profile file that says which symbols hold for the build the
//! generated code is for, and leaves out whatever is compiled out there.

use std::collections::BTreeMap;
use std::fmt;

use crate::parse::Value;

/// A condition: a symbol, or `all`/`any`/`not` of conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// A preprocessor symbol such as `CONFIG_VNC`.
    Atom(String),
    /// Every one holds.
    All(Vec<Cond>),
    /// At least one holds.
    Any(Vec<Cond>),
    /// It does not hold.
    Not(Box<Cond>),
}

impl Cond {
    /// Reads an `'if'` value.
    pub fn from_value(v: &Value) -> Result<Cond, String> {
        match v {
            Value::Str(s) => Ok(Cond::Atom(s.clone())),
            Value::Dict(d) if d.len() == 1 => {
                let (k, v) = &d[0];
                let list = |v: &Value| -> Result<Vec<Cond>, String> {
                    match v {
                        Value::List(items) if !items.is_empty() => {
                            items.iter().map(Cond::from_value).collect()
                        }
                        _ => Err(format!("'{k}' needs a non-empty list")),
                    }
                };
                match k.as_str() {
                    "all" => Ok(Cond::All(list(v)?)),
                    "any" => Ok(Cond::Any(list(v)?)),
                    "not" => Ok(Cond::Not(Box::new(Cond::from_value(v)?))),
                    _ => Err(format!("unknown condition operator '{k}'")),
                }
            }
            _ => Err("a condition is a string or a one-key object".into()),
        }
    }

    /// Every symbol it mentions.
    pub fn atoms<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Cond::Atom(a) => out.push(a),
            Cond::All(c) | Cond::Any(c) => c.iter().for_each(|c| c.atoms(out)),
            Cond::Not(c) => c.atoms(out),
        }
    }

    /// Evaluates it; a symbol the profile does not decide is an error, so a
    /// new one in a new schema is never silently taken as false.
    pub fn eval(&self, profile: &Profile) -> Result<bool, String> {
        Ok(match self {
            Cond::Atom(a) => profile
                .get(a)
                .ok_or_else(|| format!("the profile does not say whether {a} holds"))?,
            Cond::All(c) => {
                let mut all = true;
                for c in c {
                    all &= c.eval(profile)?;
                }
                all
            }
            Cond::Any(c) => {
                let mut any = false;
                for c in c {
                    any |= c.eval(profile)?;
                }
                any
            }
            Cond::Not(c) => !c.eval(profile)?,
        })
    }
}

impl fmt::Display for Cond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, op: &str, c: &[Cond]| {
            write!(f, "{op}(")?;
            for (i, c) in c.iter().enumerate() {
                if i > 0 {
                    write!(f, ", ")?;
                }
                write!(f, "{c}")?;
            }
            write!(f, ")")
        };
        match self {
            Cond::Atom(a) => write!(f, "{a}"),
            Cond::All(c) => list(f, "all", c),
            Cond::Any(c) => list(f, "any", c),
            Cond::Not(c) => write!(f, "not({c})"),
        }
    }
}

/// Which symbols hold for one build.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    symbols: BTreeMap<String, bool>,
    /// The answer for symbols not listed; `None` makes them an error.
    otherwise: Option<bool>,
}

impl Profile {
    /// A profile from `(symbol, holds)` pairs.
    pub fn new<'a>(symbols: impl IntoIterator<Item = (&'a str, bool)>) -> Self {
        Profile {
            symbols: symbols.into_iter().map(|(s, b)| (s.to_owned(), b)).collect(),
            otherwise: None,
        }
    }

    /// A profile under which every symbol holds (to read a schema whole).
    pub fn everything() -> Self {
        Profile {
            symbols: BTreeMap::new(),
            otherwise: Some(true),
        }
    }

    /// Reads a profile file: one `SYMBOL yes` or `SYMBOL no` a line; `#`
    /// starts a comment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut symbols = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(sym), Some(val), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("profile line {}: expected 'SYMBOL yes|no'", n + 1));
            };
            let val = match val {
                "yes" => true,
                "no" => false,
                _ => return Err(format!("profile line {}: '{val}' is neither yes nor no", n + 1)),
            };
            if symbols.insert(sym.to_owned(), val).is_some() {
                return Err(format!("profile line {}: {sym} given twice", n + 1));
            }
        }
        Ok(Profile {
            symbols,
            otherwise: None,
        })
    }

    /// Whether `symbol` holds, if the profile says.
    pub fn get(&self, symbol: &str) -> Option<bool> {
        self.symbols.get(symbol).copied().or(self.otherwise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;

    fn cond(src: &str) -> Cond {
        let e = parse(&format!("{{ 'if': {src} }}")).unwrap();
        Cond::from_value(e[0].value.get("if").unwrap()).unwrap()
    }

    #[test]
    fn evaluates_against_the_profile() {
        let p = Profile::parse("A yes\nB no # comment\n\n# C is unknown\n").unwrap();
        assert!(cond("'A'").eval(&p).unwrap());
        assert!(!cond("'B'").eval(&p).unwrap());
        assert!(!cond("{ 'all': ['A', 'B'] }").eval(&p).unwrap());
        assert!(cond("{ 'any': ['B', 'A'] }").eval(&p).unwrap());
        assert!(cond("{ 'not': 'B' }").eval(&p).unwrap());
        assert!(cond("{ 'any': ['A', 'C'] }").eval(&p).is_err());
        assert_eq!(
            cond("{ 'all': ['A', { 'not': 'B' }] }").to_string(),
            "all(A, not(B))"
        );
    }

    #[test]
    fn bad_profiles() {
        assert!(Profile::parse("A maybe").is_err());
        assert!(Profile::parse("A yes\nA no").is_err());
        assert!(Profile::parse("A").is_err());
    }
}
