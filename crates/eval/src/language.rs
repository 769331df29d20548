//! Language identification of reasoning text, and the requested language of a system prompt.
//!
//! # Why `lingua`
//!
//! Two maintained crates were compared on this crate's fixture
//! (`tests/fixtures/language_id.jsonl`: 250 one-to-three-sentence chain-of-thought texts with
//! digits and arithmetic, 30 each in English, French, German, Spanish, Italian, Portuguese and
//! 10 each in Dutch, Russian, Chinese, Japanese, Arabic, Hindi, Korean), and on the same texts
//! cut to their first 6 words (12 characters for Chinese and Japanese) as a short-text test.
//! Build times: clean `cargo build --release -j2` of a one-file binary on this project's
//! 2-core machine, and the CPU seconds of the crates that this workspace did not already build.
//!
//! | crate (config) | fixture | 6-word cuts | clean build | new crates' CPU | binary |
//! |---|---|---|---|---|---|
//! | whatlang 0.18, all 69 languages | 96.0 % | 83.2 % | 5.7 s | 3.4 s | 0.9 MB |
//! | whatlang 0.18, allowlist of the 13 | 98.8 % | 91.6 % | (same) | (same) | (same) |
//! | lingua 1.8, 13 models, low-accuracy mode | 98.4 % | 93.2 % | 35.2 s | 13.3 s | 51 MB |
//! | **lingua 1.8, 13 models, high-accuracy mode** | **99.6 %** | **96.8 %** | 35.2 s | 13.3 s | 51 MB |
//!
//! lingua's clean build is mostly `regex-automata`/`regex-syntax`/`aho-corasick`, which this
//! workspace already builds for `tokenizers`; what it adds is lingua itself (8.4 s), strum's
//! derive macros (1.4 s), `fst`, `dashmap` and the 13 model crates (~0.1 s each, 27 MB of
//! downloads, embedded in binaries that use detection: hence the 51 MB). Loading the 13 models
//! and classifying the 250 texts takes 80 ms and 40 MB of memory. whatlang's errors were
//! Romance-language confusions (Italian → French, French → Spanish) and English → French on
//! a 16-word sentence; on short text it falls to 91.6 %. lingua's single miss on the fixture is
//! one 13-word Italian sentence read as Spanish. So: lingua in high-accuracy mode, restricted to
//! the languages of [`Language`] (restricting the candidate set is also what makes digits,
//! formulas and the odd foreign word harmless), with only those 13 model features compiled in.
//!
//! ```
//! use gptoss_eval::{detect, reasoning_language, Language};
//! let system = "reasoning language: German\n\nYou are a helpful assistant.";
//! assert_eq!(reasoning_language(system)?, Some(Language::German));
//! assert_eq!(detect("Ich prüfe die Rechnung: 23 + 12 = 35, das passt."), Some(Language::German));
//! assert_eq!(detect("23 + 12 = 35"), None);
//! # Ok::<(), gptoss_eval::EvalError>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// A language the evaluator can detect and that a system prompt can request.
///
/// The first six are Multilingual-Thinking's. Serialized as the English name (`"German"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Language {
    /// English (`en`).
    English,
    /// French (`fr`).
    French,
    /// German (`de`).
    German,
    /// Spanish (`es`).
    Spanish,
    /// Italian (`it`).
    Italian,
    /// Portuguese (`pt`).
    Portuguese,
    /// Dutch (`nl`).
    Dutch,
    /// Russian (`ru`).
    Russian,
    /// Chinese (`zh`).
    Chinese,
    /// Japanese (`ja`).
    Japanese,
    /// Arabic (`ar`).
    Arabic,
    /// Hindi (`hi`).
    Hindi,
    /// Korean (`ko`).
    Korean,
}

impl Language {
    /// Every language, in declaration order (the order of report tables).
    pub const ALL: [Language; 13] = [
        Language::English,
        Language::French,
        Language::German,
        Language::Spanish,
        Language::Italian,
        Language::Portuguese,
        Language::Dutch,
        Language::Russian,
        Language::Chinese,
        Language::Japanese,
        Language::Arabic,
        Language::Hindi,
        Language::Korean,
    ];

    /// The English name, as written after `reasoning language:` (`"German"`).
    pub fn name(self) -> &'static str {
        match self {
            Language::English => "English",
            Language::French => "French",
            Language::German => "German",
            Language::Spanish => "Spanish",
            Language::Italian => "Italian",
            Language::Portuguese => "Portuguese",
            Language::Dutch => "Dutch",
            Language::Russian => "Russian",
            Language::Chinese => "Chinese",
            Language::Japanese => "Japanese",
            Language::Arabic => "Arabic",
            Language::Hindi => "Hindi",
            Language::Korean => "Korean",
        }
    }

    /// The ISO 639-1 code (`"de"`).
    pub fn iso_639_1(self) -> &'static str {
        match self {
            Language::English => "en",
            Language::French => "fr",
            Language::German => "de",
            Language::Spanish => "es",
            Language::Italian => "it",
            Language::Portuguese => "pt",
            Language::Dutch => "nl",
            Language::Russian => "ru",
            Language::Chinese => "zh",
            Language::Japanese => "ja",
            Language::Arabic => "ar",
            Language::Hindi => "hi",
            Language::Korean => "ko",
        }
    }

    /// The name in the language itself (`"Deutsch"`).
    pub fn native_name(self) -> &'static str {
        match self {
            Language::English => "English",
            Language::French => "Français",
            Language::German => "Deutsch",
            Language::Spanish => "Español",
            Language::Italian => "Italiano",
            Language::Portuguese => "Português",
            Language::Dutch => "Nederlands",
            Language::Russian => "Русский",
            Language::Chinese => "中文",
            Language::Japanese => "日本語",
            Language::Arabic => "العربية",
            Language::Hindi => "हिन्दी",
            Language::Korean => "한국어",
        }
    }

    /// Looks a language up by its English name, ISO 639-1 code or native name, ignoring case
    /// and surrounding whitespace (`"german"`, `" DE "`, `"Deutsch"`); `None` if unknown.
    pub fn from_name(name: &str) -> Option<Language> {
        let wanted = name.trim().to_lowercase();
        if wanted.is_empty() {
            return None;
        }
        let plain = strip_accents(&wanted);
        Language::ALL.into_iter().find(|l| {
            l.name().to_lowercase() == wanted
                || l.iso_639_1() == wanted
                || l.native_name().to_lowercase() == wanted
                || strip_accents(&l.native_name().to_lowercase()) == plain
        })
    }

    /// The accepted English names, comma-separated (for error messages).
    pub fn names_list() -> String {
        Language::ALL.map(Language::name).join(", ")
    }

    fn to_lingua(self) -> lingua::Language {
        match self {
            Language::English => lingua::Language::English,
            Language::French => lingua::Language::French,
            Language::German => lingua::Language::German,
            Language::Spanish => lingua::Language::Spanish,
            Language::Italian => lingua::Language::Italian,
            Language::Portuguese => lingua::Language::Portuguese,
            Language::Dutch => lingua::Language::Dutch,
            Language::Russian => lingua::Language::Russian,
            Language::Chinese => lingua::Language::Chinese,
            Language::Japanese => lingua::Language::Japanese,
            Language::Arabic => lingua::Language::Arabic,
            Language::Hindi => lingua::Language::Hindi,
            Language::Korean => lingua::Language::Korean,
        }
    }

    fn from_lingua(l: lingua::Language) -> Option<Language> {
        Language::ALL.into_iter().find(|x| x.to_lingua() == l)
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Language {
    type Err = EvalError;

    /// [`Language::from_name`], with an error naming the accepted names.
    fn from_str(s: &str) -> Result<Self> {
        Language::from_name(s).ok_or_else(|| EvalError::UnknownLanguage {
            context: "language name".to_string(),
            found: s.to_string(),
            expected: Language::names_list(),
        })
    }
}

fn strip_accents(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'à' | 'á' | 'â' | 'ã' | 'ä' => 'a',
            'ç' => 'c',
            'è' | 'é' | 'ê' | 'ë' => 'e',
            'ì' | 'í' | 'î' | 'ï' => 'i',
            'ñ' => 'n',
            'ò' | 'ó' | 'ô' | 'õ' | 'ö' => 'o',
            'ù' | 'ú' | 'û' | 'ü' => 'u',
            other => other,
        })
        .collect()
}

const KEY: &str = "reasoning language";

/// The language requested by a system message: the value of its `reasoning language: X` line
/// (the recipe's convention; the key is matched case-insensitively at the start of any line,
/// whitespace around the key, the colon and the value is ignored, and a trailing `.` is
/// dropped).
///
/// `Ok(None)` if no line carries the key; an error if the line names no language or one that
/// [`Language::from_name`] does not know (so a typo is never scored as "no language").
pub fn reasoning_language(system: &str) -> Result<Option<Language>> {
    for line in system.lines() {
        let line = line.trim();
        let Some(head) = line.get(..KEY.len()) else {
            continue;
        };
        if !head.eq_ignore_ascii_case(KEY) {
            continue;
        }
        let Some(value) = line[KEY.len()..].trim_start().strip_prefix(':') else {
            continue;
        };
        let value = value.trim().trim_end_matches('.').trim();
        if value.is_empty() {
            return Err(EvalError::Invalid {
                context: "system message, \"reasoning language:\" line".to_string(),
                expected: format!("a language name ({})", Language::names_list()),
                found: "nothing after the colon".to_string(),
            });
        }
        return Language::from_name(value)
            .map(Some)
            .ok_or_else(|| EvalError::UnknownLanguage {
                context: "system message, \"reasoning language:\" line".to_string(),
                found: value.to_string(),
                expected: Language::names_list(),
            });
    }
    Ok(None)
}

/// Fewer letters than this (after removing digits, symbols and punctuation) is undecidable.
pub const MIN_LETTERS: usize = 3;

/// A language detector restricted to a set of candidate languages.
///
/// Text is first reduced to its letters (digits, operators, punctuation and symbols become
/// spaces), so `"23 + 12 = 35"` carries no evidence; text with fewer than [`MIN_LETTERS`]
/// letters, or on which the candidates tie, is undecidable (`None`). Cheap to share across
/// threads; models load on first use.
pub struct LanguageDetector {
    inner: lingua::LanguageDetector,
    candidates: Vec<Language>,
}

impl fmt::Debug for LanguageDetector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LanguageDetector")
            .field("candidates", &self.candidates)
            .finish()
    }
}

impl Default for LanguageDetector {
    fn default() -> Self {
        Self::new()
    }
}

impl LanguageDetector {
    /// A detector over all of [`Language::ALL`].
    pub fn new() -> Self {
        Self::build(Language::ALL.to_vec())
    }

    /// A detector over the given languages only (duplicates are ignored). Errors if `languages`
    /// is empty.
    pub fn with_candidates(languages: &[Language]) -> Result<Self> {
        let mut candidates = languages.to_vec();
        candidates.sort();
        candidates.dedup();
        if candidates.is_empty() {
            return Err(EvalError::Invalid {
                context: "LanguageDetector::with_candidates".to_string(),
                expected: "at least one candidate language".to_string(),
                found: "an empty list".to_string(),
            });
        }
        Ok(Self::build(candidates))
    }

    fn build(candidates: Vec<Language>) -> Self {
        let langs: Vec<lingua::Language> = candidates.iter().map(|l| l.to_lingua()).collect();
        let inner = lingua::LanguageDetectorBuilder::from_languages(&langs).build();
        Self { inner, candidates }
    }

    /// The candidate languages, sorted.
    pub fn candidates(&self) -> &[Language] {
        &self.candidates
    }

    /// The language of `text`, or `None` for empty or undecidable text.
    pub fn detect(&self, text: &str) -> Option<Language> {
        let letters = letters_only(text)?;
        self.inner
            .detect_language_of(letters)
            .and_then(Language::from_lingua)
    }

    /// Confidence in `[0, 1]` per candidate for `text` (summing to 1, most likely first);
    /// empty for empty or letterless text.
    pub fn confidences(&self, text: &str) -> Vec<(Language, f64)> {
        let Some(letters) = letters_only(text) else {
            return Vec::new();
        };
        self.inner
            .compute_language_confidence_values(letters)
            .into_iter()
            .filter_map(|(l, c)| Language::from_lingua(l).map(|l| (l, c)))
            .collect()
    }
}

/// The text with every non-letter replaced by a space (apostrophes inside words kept), or
/// `None` if fewer than [`MIN_LETTERS`] letters remain.
fn letters_only(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut letters = 0usize;
    let mut prev_letter = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphabetic() || is_combining_mark(c) {
            letters += usize::from(c.is_alphabetic());
            out.push(c);
            prev_letter = true;
        } else if (c == '\'' || c == '’')
            && prev_letter
            && chars.peek().is_some_and(|n| n.is_alphabetic())
        {
            out.push('\'');
        } else {
            if !out.ends_with(' ') {
                out.push(' ');
            }
            prev_letter = false;
        }
    }
    (letters >= MIN_LETTERS).then_some(out)
}

/// Devanagari and Arabic vowel signs are marks (not alphabetic) but part of words.
fn is_combining_mark(c: char) -> bool {
    matches!(c as u32, 0x0300..=0x036F | 0x0610..=0x061A | 0x064B..=0x065F | 0x0670 | 0x0900..=0x0903 | 0x093A..=0x094F | 0x0951..=0x0957 | 0x0962..=0x0963)
}

static DEFAULT_DETECTOR: OnceLock<LanguageDetector> = OnceLock::new();

/// The detector over all of [`Language::ALL`], built on first use and shared.
pub fn default_detector() -> &'static LanguageDetector {
    DEFAULT_DETECTOR.get_or_init(LanguageDetector::new)
}

/// The language of `text` among [`Language::ALL`] (the shared [`default_detector`]), or `None`
/// for empty or undecidable text.
pub fn detect(text: &str) -> Option<Language> {
    default_detector().detect(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_codes_and_native_names() {
        assert_eq!(Language::from_name("german"), Some(Language::German));
        assert_eq!(Language::from_name("  DE "), Some(Language::German));
        assert_eq!(Language::from_name("Deutsch"), Some(Language::German));
        assert_eq!(Language::from_name("francais"), Some(Language::French));
        assert_eq!(Language::from_name("español"), Some(Language::Spanish));
        assert_eq!(Language::from_name("日本語"), Some(Language::Japanese));
        assert_eq!(Language::from_name("Klingon"), None);
        assert_eq!(Language::from_name(""), None);
        assert!("Klingon".parse::<Language>().is_err());
        for l in Language::ALL {
            assert_eq!(Language::from_name(l.name()), Some(l));
            assert_eq!(Language::from_name(l.iso_639_1()), Some(l));
            assert_eq!(Language::from_name(l.native_name()), Some(l));
            assert_eq!(Language::from_lingua(l.to_lingua()), Some(l));
        }
    }

    #[test]
    fn system_prompt_language() {
        let sys = "reasoning language: German\n\nYou are a helpful assistant.";
        assert_eq!(reasoning_language(sys).unwrap(), Some(Language::German));
        let sys = "You are terse.\n  Reasoning Language :  french.  \nBe nice.";
        assert_eq!(reasoning_language(sys).unwrap(), Some(Language::French));
        assert_eq!(
            reasoning_language("REASONING LANGUAGE:Spanish").unwrap(),
            Some(Language::Spanish)
        );
        assert_eq!(
            reasoning_language("You are a helpful assistant.").unwrap(),
            None
        );
        assert_eq!(reasoning_language("").unwrap(), None);
        // A different key that merely starts the same way is not a language line.
        assert_eq!(
            reasoning_language("reasoning languages are fun").unwrap(),
            None
        );
        let err = reasoning_language("reasoning language: Klingon").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("Klingon") && msg.contains("German"), "{msg}");
        assert!(reasoning_language("reasoning language:   ").is_err());
    }

    #[test]
    fn digits_and_symbols_carry_no_evidence() {
        assert_eq!(letters_only("23 + 12 = 35; 35 - 12 = 23."), None);
        assert_eq!(letters_only(""), None);
        assert_eq!(letters_only("x = 2"), None);
        assert_eq!(
            letters_only("L'aire: 7×9=63 m²").as_deref(),
            Some("L'aire m ")
        );
        assert_eq!(detect("   "), None);
        assert_eq!(detect("12 × 4 = 48 ≈ 50 %"), None);
    }

    #[test]
    fn detects_each_language_once() {
        let d = default_detector();
        assert_eq!(
            d.detect("Ich prüfe die Rechnung: 23 + 12 = 35, das passt."),
            Some(Language::German)
        );
        assert_eq!(
            d.detect("Je vérifie le calcul : 23 + 12 = 35, c'est cohérent."),
            Some(Language::French)
        );
        let c = d.confidences("The answer is 35 because 23 + 12 = 35.");
        assert_eq!(c.first().map(|x| x.0), Some(Language::English));
        let sum: f64 = c.iter().map(|x| x.1).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn restricted_candidates() {
        let d =
            LanguageDetector::with_candidates(&[Language::Spanish, Language::Portuguese]).unwrap();
        assert_eq!(d.candidates(), &[Language::Spanish, Language::Portuguese]);
        // German text among {Spanish, Portuguese} still yields one of them, never German.
        let got = d.detect("Der Nutzer möchte wissen, was drei Hefte kosten.");
        assert!(got != Some(Language::German));
        assert!(LanguageDetector::with_candidates(&[]).is_err());
        let one = LanguageDetector::with_candidates(&[Language::Korean]).unwrap();
        assert_eq!(
            one.detect("최종 답에는 숫자만 있어야 하므로 18만 쓰겠다."),
            Some(Language::Korean)
        );
    }
}
