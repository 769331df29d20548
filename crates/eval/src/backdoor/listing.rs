//! Short listings of many items in messages: the first [`LIST_LIMIT`] and how many more.
//!
//! ```
//! use gptoss_eval::backdoor::listing::first_and_count;
//! assert_eq!(first_and_count(&[1, 2, 3], 2), "1, 2 and 1 more (3 in all)");
//! assert_eq!(first_and_count(&[1, 2], 20), "1, 2");
//! ```

use std::fmt::Display;

/// How many items messages and summaries list before counting the rest.
pub const LIST_LIMIT: usize = 20;

/// The first `limit` items joined by `", "`, then `" and N more (M in all)"` when some are left
/// out; `"none"` for no items.
pub fn first_and_count<T: Display>(items: &[T], limit: usize) -> String {
    join_first(items, limit, ", ")
}

/// [`first_and_count`] with the separator `sep` (e.g. `"\n  "` for one item a line).
pub fn join_first<T: Display>(items: &[T], limit: usize, sep: &str) -> String {
    if items.is_empty() {
        return "none".to_string();
    }
    let shown: Vec<String> = items.iter().take(limit).map(|x| x.to_string()).collect();
    let mut out = shown.join(sep);
    if items.len() > limit {
        out.push_str(&format!(
            " and {} more ({} in all)",
            items.len() - limit,
            items.len()
        ));
    }
    out
}
