//! Answer extraction and matching, GSM8K conventions.
//!
//! - Reference: the text after the last `####` of the reference solution (`"… #### 72"`), or
//!   the whole reference if it has no `####`; numeric when that text holds exactly one number
//!   (`"72"`, `"$1,234"`, `"The answer is 42."`), else a text answer (exact match).
//! - Prediction (from the final channel): the first number after the last `####` if there is
//!   one, else the last number in the text.
//! - Numbers are compared exactly as rationals after normalisation: thousands separators
//!   (`1,234`, `1 234` with a no-break or thin space) are dropped, a leading `+` is ignored,
//!   `-` and `−` negate, `3.50 == 3.5`, a decimal comma with one or two digits (`2,5`) is a
//!   decimal point, a trailing `.` ends a sentence, currency signs and units around the number
//!   (`$18`, `18 dollars`, `18%`, `18 €`) are ignored, and a fraction `3/4` equals `0.75`.
//!   Arabic-Indic, Devanagari and full-width digits read as ASCII digits. A `-` directly after
//!   a letter or digit is a hyphen or a subtraction, not a sign (`35-12` reads 35 and 12).
//! - Text answers match when equal after trimming, lower-casing, collapsing whitespace and
//!   dropping one trailing `.`.
//!
//! ```
//! use gptoss_eval::answer::{answers_match, extract_reference, Answer, Number};
//! let reference = "48/2 = 24 clips in May.\n#### 72";
//! assert_eq!(extract_reference(reference), Some(Answer::Number(Number::integer(72))));
//! let verdict = answers_match("Natalia sold **72** clips altogether.", reference).unwrap();
//! assert!(verdict.correct);
//! assert!(answers_match("She sold $1,234.50", "#### 1234.5").unwrap().correct);
//! assert!(!answers_match("I don't know.", "#### 72").unwrap().correct);
//! ```

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::EvalError;

/// An exact rational number (reduced, positive denominator).
///
/// Serialized as its canonical text: `"72"`, `"-3.5"`, `"1/3"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Number {
    num: i128,
    den: i128,
}

impl Number {
    /// The integer `n`.
    pub fn integer(n: i64) -> Number {
        Number {
            num: i128::from(n),
            den: 1,
        }
    }

    /// `num / den` reduced; `None` if `den` is zero.
    pub fn ratio(num: i128, den: i128) -> Option<Number> {
        if den == 0 {
            return None;
        }
        let g = gcd(num.unsigned_abs(), den.unsigned_abs());
        let g = i128::try_from(g).ok()?;
        let (mut num, mut den) = (num / g, den / g);
        if den < 0 {
            num = num.checked_neg()?;
            den = den.checked_neg()?;
        }
        Some(Number { num, den })
    }

    /// Numerator (sign carrier).
    pub fn numerator(&self) -> i128 {
        self.num
    }

    /// Denominator (≥ 1).
    pub fn denominator(&self) -> i128 {
        self.den
    }

    /// The nearest `f64`.
    pub fn to_f64(&self) -> f64 {
        self.num as f64 / self.den as f64
    }

    /// Parses one number written alone (surrounding whitespace, currency signs and units
    /// allowed: `" $1,234.50 "`, `"18%"`, `"-3/4"`); `None` if the text holds anything else
    /// or more than one number.
    pub fn parse_standalone(text: &str) -> Option<Number> {
        let text = normalize_digits(text);
        let found = scan_numbers(&text);
        let [only] = found.as_slice() else {
            return None;
        };
        let rest = format!("{}{}", &text[..only.start], &text[only.end..]);
        let rest = rest.trim().trim_end_matches('.').trim();
        if rest.chars().all(is_unit_char) || is_unit_word(rest) {
            Some(only.value)
        } else {
            None
        }
    }

    /// Decimal digits of the denominator if it is of the form 2^a 5^b (so the number has a
    /// finite decimal expansion).
    fn decimal_places(&self) -> Option<u32> {
        let mut d = self.den;
        let (mut twos, mut fives) = (0u32, 0u32);
        while d % 2 == 0 {
            d /= 2;
            twos += 1;
        }
        while d % 5 == 0 {
            d /= 5;
            fives += 1;
        }
        (d == 1).then_some(twos.max(fives))
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    if a == 0 {
        1
    } else {
        a
    }
}

impl fmt::Display for Number {
    /// Integers as integers, finite decimals in decimal notation (`-3.5`), others as `a/b`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            return write!(f, "{}", self.num);
        }
        match self.decimal_places() {
            Some(places) if places <= 30 => {
                let scale = 10i128.checked_pow(places);
                let scaled = scale.and_then(|s| (s / self.den).checked_mul(self.num));
                match (scale, scaled) {
                    (Some(scale), Some(scaled)) => {
                        let sign = if scaled < 0 { "-" } else { "" };
                        let abs = scaled.unsigned_abs();
                        let scale = scale.unsigned_abs();
                        write!(
                            f,
                            "{sign}{}.{:0width$}",
                            abs / scale,
                            abs % scale,
                            width = places as usize
                        )
                    }
                    _ => write!(f, "{}/{}", self.num, self.den),
                }
            }
            _ => write!(f, "{}/{}", self.num, self.den),
        }
    }
}

impl PartialOrd for Number {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Number {
    fn cmp(&self, other: &Self) -> Ordering {
        match (
            self.num.checked_mul(other.den),
            other.num.checked_mul(self.den),
        ) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => self.to_f64().total_cmp(&other.to_f64()),
        }
    }
}

impl FromStr for Number {
    type Err = EvalError;

    /// [`Number::parse_standalone`], with an error naming the text.
    fn from_str(s: &str) -> Result<Self, EvalError> {
        Number::parse_standalone(s).ok_or_else(|| EvalError::Invalid {
            context: "number".to_string(),
            expected: "one number such as 72, -3.5, 1,234 or 3/4".to_string(),
            found: format!("{s:?}"),
        })
    }
}

impl Serialize for Number {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An answer: a number (GSM8K) or a normalised text (exact match).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// A numeric answer.
    Number(Number),
    /// A text answer, stored normalised (see [`normalize_text`]).
    Text(String),
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Number(n) => n.fmt(f),
            Answer::Text(t) => f.write_str(t),
        }
    }
}

/// The outcome of comparing a prediction with a reference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerVerdict {
    /// The reference answer.
    pub reference: Answer,
    /// What was extracted from the prediction (`None`: no number in it, or an empty text).
    pub predicted: Option<Answer>,
    /// Whether they match.
    pub correct: bool,
}

/// The reference answer of a reference solution, or `None` if it holds none (empty text, or
/// nothing after `####`).
pub fn extract_reference(reference_solution: &str) -> Option<Answer> {
    let tail = match reference_solution.rfind("####") {
        Some(i) => &reference_solution[i + 4..],
        None => reference_solution,
    };
    let digits = normalize_digits(tail);
    if let [only] = scan_numbers(&digits).as_slice() {
        return Some(Answer::Number(only.value));
    }
    let text = normalize_text(tail);
    (!text.is_empty()).then_some(Answer::Text(text))
}

/// The number a final-channel text answers with: the first number after the last `####`, else
/// the last number in the text; `None` if there is no number.
pub fn predicted_number(final_text: &str) -> Option<Number> {
    let text = normalize_digits(final_text);
    if let Some(i) = text.rfind("####") {
        if let Some(first) = scan_numbers(&text[i + 4..]).first() {
            return Some(first.value);
        }
    }
    scan_numbers(&text).last().map(|m| m.value)
}

/// Compares a final-channel text with a reference answer: numerically (see
/// [`predicted_number`]) for a numeric reference, by normalised text otherwise.
pub fn judge(final_text: &str, reference: &Answer) -> AnswerVerdict {
    let predicted = match reference {
        Answer::Number(_) => predicted_number(final_text).map(Answer::Number),
        Answer::Text(_) => {
            let t = normalize_text(final_text);
            (!t.is_empty()).then_some(Answer::Text(t))
        }
    };
    let correct = predicted.as_ref() == Some(reference);
    AnswerVerdict {
        reference: reference.clone(),
        predicted,
        correct,
    }
}

/// [`judge`] against the answer of a reference solution; `None` if the reference holds no
/// answer (the row is then skipped by answer accuracy).
pub fn answers_match(
    predicted_final_text: &str,
    reference_solution: &str,
) -> Option<AnswerVerdict> {
    extract_reference(reference_solution).map(|r| judge(predicted_final_text, &r))
}

/// Trims, lower-cases, collapses whitespace runs to one space and drops one trailing `.`.
pub fn normalize_text(text: &str) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let lowered = collapsed.to_lowercase();
    lowered
        .strip_suffix('.')
        .map(|s| s.trim_end().to_string())
        .unwrap_or(lowered)
}

/// A number found in a text, with its byte span.
struct Found {
    start: usize,
    end: usize,
    value: Number,
}

fn number_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        // sign and/or currency sign, then digits with optional thousands groups (comma,
        // no-break space, narrow no-break space, thin space), then an optional decimal part,
        // then an optional fraction denominator.
        let pattern = r"(?x)
            (?P<sign>[-+\u{2212}])?
            [$€£¥₹]?
            (?P<sign2>[-+\u{2212}])?
            (?P<int>[0-9]{1,3}(?:(?:,|\u{00A0}|\u{202F}|\u{2009})[0-9]{3})+|[0-9]+)
            (?:(?P<point>[.,])(?P<frac>[0-9]+))?
            (?:[\ ]?/[\ ]?(?P<den>[0-9]+))?";
        match Regex::new(pattern) {
            Ok(re) => re,
            // The pattern is a constant; a failure here is a bug caught by every test.
            Err(e) => unreachable!("number pattern: {e}"),
        }
    })
}

/// All numbers in `text` (already digit-normalised), in order.
fn scan_numbers(text: &str) -> Vec<Found> {
    let mut out = Vec::new();
    for caps in number_regex().captures_iter(text) {
        let Some(whole) = caps.get(0) else { continue };
        let Some(int) = caps.name("int") else {
            continue;
        };
        let mut start = whole.start();
        let mut before_chars = text[..start].chars().rev();
        let before = before_chars.next();
        let before2 = before_chars.next();
        let sign = caps.name("sign").or(caps.name("sign2"));
        if sign.is_none() {
            // Digits glued to a word (`x2`) or continuing a number the scan already passed
            // (`1.2.3`, `1,234,5`) are not a number of their own.
            let glued = before.is_some_and(|c| c.is_alphanumeric() || c == '_');
            let continued =
                matches!(before, Some('.' | ',')) && before2.is_some_and(|c| c.is_ascii_digit());
            if glued || continued {
                continue;
            }
        }
        let mut negative = false;
        if let Some(sign) = sign {
            // A sign right after a letter, digit or `)` is a hyphen or an operator: drop it.
            if before.is_some_and(|c| c.is_alphanumeric() || c == ')') {
                start = sign.end();
            } else {
                negative = sign.as_str() != "+";
            }
        }
        let int_digits: String = int.as_str().chars().filter(char::is_ascii_digit).collect();
        let grouped = int_digits.len() != int.as_str().len();
        let mut end = int.end();
        let mut frac_digits = String::new();
        if let (Some(point), Some(frac)) = (caps.name("point"), caps.name("frac")) {
            let decimal = if point.as_str() == "," {
                // A decimal comma: 1-2 digits after it, no thousands groups before it, and not
                // a list such as `3,4,5`.
                let list = text[frac.end()..].starts_with(',')
                    && text[frac.end() + 1..].starts_with(|c: char| c.is_ascii_digit());
                !grouped && frac.as_str().len() <= 2 && !list
            } else {
                true
            };
            if decimal {
                frac_digits = frac.as_str().to_string();
                end = frac.end();
            }
        }
        let mut den: i128 = 1;
        if let (None, Some(d)) = (caps.name("point"), caps.name("den")) {
            if let Ok(v) = d.as_str().parse::<i128>() {
                if v != 0 {
                    den = v;
                    end = d.end();
                }
            }
        }
        let Some(value) = to_number(&int_digits, &frac_digits, den, negative) else {
            continue;
        };
        out.push(Found { start, end, value });
    }
    out
}

fn to_number(int: &str, frac: &str, den: i128, negative: bool) -> Option<Number> {
    let digits = format!("{int}{frac}");
    let mantissa: i128 = digits.parse().ok()?;
    let scale = 10i128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let num = if negative {
        mantissa.checked_neg()?
    } else {
        mantissa
    };
    Number::ratio(num, scale.checked_mul(den)?)
}

/// Maps Arabic-Indic, extended Arabic-Indic, Devanagari and full-width digits to ASCII.
fn normalize_digits(text: &str) -> String {
    text.chars()
        .map(|c| {
            let cp = c as u32;
            let base = match cp {
                0x0660..=0x0669 => Some(0x0660),
                0x06F0..=0x06F9 => Some(0x06F0),
                0x0966..=0x096F => Some(0x0966),
                0xFF10..=0xFF19 => Some(0xFF10),
                _ => None,
            };
            match base.and_then(|b| char::from_digit(cp - b, 10)) {
                Some(d) => d,
                None => c,
            }
        })
        .collect()
}

fn is_unit_char(c: char) -> bool {
    c.is_whitespace() || "$€£¥₹%‰*".contains(c)
}

/// Common unit words that may follow a standalone reference number.
fn is_unit_word(rest: &str) -> bool {
    let word = rest.trim_matches(is_unit_char).to_lowercase();
    const UNITS: &[&str] = &[
        "dollar", "dollars", "usd", "euro", "euros", "eur", "cents", "cent", "percent", "%",
        "minutes", "minute", "hours", "hour", "days", "day", "years", "year", "km", "m", "cm",
        "kg", "g", "miles", "mile", "meters", "metres", "pounds", "points",
    ];
    UNITS.contains(&word.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Option<String> {
        predicted_number(s).map(|x| x.to_string())
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!(Number::ratio(7, 2).unwrap().to_string(), "3.5");
        assert_eq!(Number::ratio(-1, 3).unwrap().to_string(), "-1/3");
        assert_eq!(Number::ratio(6, -4).unwrap().to_string(), "-1.5");
        assert_eq!(Number::ratio(1, 8).unwrap().to_string(), "0.125");
        assert_eq!(Number::ratio(-1, 20).unwrap().to_string(), "-0.05");
        assert_eq!(Number::integer(-72).to_string(), "-72");
        assert!(Number::ratio(1, 0).is_none());
        for s in ["72", "-3.5", "1/3", "0.125", "-0.05"] {
            let x: Number = s.parse().unwrap();
            assert_eq!(x.to_string(), s);
        }
        assert!(Number::integer(3) < "3.5".parse().unwrap());
    }

    #[test]
    fn serde_as_text() {
        let a = Answer::Number(Number::ratio(7, 2).unwrap());
        let j = serde_json::to_string(&a).unwrap();
        assert_eq!(j, r#"{"number":"3.5"}"#);
        assert_eq!(serde_json::from_str::<Answer>(&j).unwrap(), a);
        assert!(serde_json::from_str::<Number>(r#""abc""#).is_err());
    }

    #[test]
    fn signs_hyphens_and_operators() {
        assert_eq!(n("35-12=23"), Some("23".into()));
        assert_eq!(n("the range 3-4"), Some("4".into()));
        assert_eq!(n("it is -4"), Some("-4".into()));
        assert_eq!(n("(−7)"), Some("-7".into()));
        assert_eq!(n("f(x)-3"), Some("3".into()));
        assert_eq!(n("x2 apples"), None);
        assert_eq!(n("1.2.3"), Some("1.2".into()));
    }

    #[test]
    fn huge_numbers_are_not_numbers() {
        let big = "9".repeat(60);
        assert_eq!(n(&big), None);
        assert_eq!(n(&format!("{big} or 5")), Some("5".into()));
    }
}
