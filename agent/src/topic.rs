//! MQTT topic names and filters: validation and matching.
//!
//! Why not rumqttc's helpers: its `matches` slices `topic[..1]`, which panics on a topic
//! that starts with a multi-byte character — an input path must never panic. These are
//! small, total functions (no panics for any UTF-8 input), property-tested.

/// A topic *name* (what a PUBLISH carries): non-empty, no wildcards, no NUL,
/// at most 65535 bytes.
pub fn check_name(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    if t.len() > u16::MAX as usize {
        return Err("is longer than MQTT's 65535 bytes".into());
    }
    if t.contains(['+', '#']) {
        return Err(format!(
            "{t:?} contains a wildcard (+ or #); a topic name must not"
        ));
    }
    if t.contains('\0') {
        return Err("contains a NUL character".into());
    }
    Ok(())
}

/// A topic *filter* (what SUBSCRIBE carries): non-empty; `#` only as the whole last
/// level; `+` only as a whole level; no NUL; at most 65535 bytes.
pub fn check_filter(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("must not be empty".into());
    }
    if f.len() > u16::MAX as usize || f.contains('\0') {
        return Err("is too long or contains NUL".into());
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!("{f:?}: '#' must be the whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("{f:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// Does topic name `topic` match `filter`? Topics starting with `$` are not matched by
/// filters starting with a wildcard (MQTT 3.1.1 §4.7.2).
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match t.next() {
            Some(level) if f == "+" || f == level => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// Does `topic` match any of `filters`?
pub fn matches_any(topic: &str, filters: &[String]) -> bool {
    filters.iter().any(|f| matches(topic, f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matching() {
        for (t, f, want) in [
            ("a/b/c", "a/b/c", true),
            ("a/b/c", "a/+/c", true),
            ("a/b/c", "a/#", true),
            ("a", "a/#", true),
            ("a/b", "a/+", true),
            ("a/b/c", "a/+", false),
            ("a", "a/+", false),
            ("a/b", "#", true),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "$SYS/#", true),
            ("/a", "+/a", true),
            ("a/", "a/+", true),
            ("é/x", "é/+", true),
            ("é/x", "#", true),
        ] {
            assert_eq!(matches(t, f), want, "{t} vs {f}");
        }
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "/", "$SYS/#"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+/c", "##"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
        assert!(check_name("a/b").is_ok());
        assert!(check_name("a/+").is_err());
        assert!(check_name("").is_err());
    }

    proptest! {
        #[test]
        fn never_panics_and_exact_filter_matches_itself(topic in "\\PC{0,30}", filter in "\\PC{0,30}") {
            let _ = matches(&topic, &filter);
            let _ = check_filter(&filter);
            let _ = check_name(&topic);
            if check_name(&topic).is_ok() && !topic.starts_with('$') {
                prop_assert!(matches(&topic, &topic));
                prop_assert!(matches(&topic, "#"));
            }
        }
    }
}
