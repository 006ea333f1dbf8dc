//! What a SIGHUP can change in a running agent. Pure: two validated configs in, the
//! changed keys out, sorted into those applied live and those that need a restart.
//!
//! Live: the log level (`[log] level`), the rate cap (`[rate] max_rate`), and the
//! policies' topics, priorities and degradation as long as the streams stay the same
//! (names, in order) and so does each stream's drain order (a lane half-way through a
//! backlog cannot change direction without sending records twice). Everything else —
//! listeners, the buffer, the upstream, new or removed streams — needs a restart, and
//! the agent says so rather than pretending.
//!
//! Keys are compared on the effective configuration (`render`), so a default written
//! out explicitly is no change.

use toml::{Table, Value};

use super::Config;

/// The changed keys of a reload, as "section.key".
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub live: Vec<String>,
    pub restart: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.restart.is_empty()
    }
}

fn tables(c: &Config) -> Table {
    c.render().parse::<Table>().unwrap_or_default()
}

/// Streams of a config's policies, with their drain orders, in order.
fn streams(c: &Config) -> Vec<(String, &'static str)> {
    c.policies
        .streams()
        .iter()
        .map(|s| (s.name.clone(), s.drain.as_str()))
        .collect()
}

pub fn changes(old: &Config, new: &Config) -> Changes {
    let (a, b) = (tables(old), tables(new));
    let mut out = Changes::default();
    let mut sections: Vec<&String> = a.keys().chain(b.keys()).collect();
    sections.sort();
    sections.dedup();
    for section in sections {
        let (x, y) = (a.get(section), b.get(section));
        if x == y {
            continue;
        }
        if section == "policy" {
            if streams(old) == streams(new) {
                out.live.push("policy".into());
            } else {
                out.restart
                    .push("policy (streams or their drain order)".into());
            }
            continue;
        }
        let empty = Value::Table(Table::new());
        let (Value::Table(x), Value::Table(y)) = (x.unwrap_or(&empty), y.unwrap_or(&empty)) else {
            // Arrays of tables ([[socket]]): any change needs a restart.
            out.restart.push(section.clone());
            continue;
        };
        let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            if x.get(key) == y.get(key) {
                continue;
            }
            let name = format!("{section}.{key}");
            match name.as_str() {
                "log.level" | "rate.max_rate" => out.live.push(name),
                _ => out.restart.push(name),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "[agent]\ngateway_id = \"gw1\"\n[upstream]\nurl = \"mqtt://127.0.0.1:1883\"\n{extra}"
        );
        Config::parse(&text, Path::new("/etc/edgerelay/t.toml")).expect("valid")
    }

    #[test]
    fn sorts_live_from_restart() {
        let base = cfg(
            "[rate]\nmax_rate = \"1mbit\"\n[[policy]]\ntopics = [\"a/#\"]\npriority = \"low\"\n",
        );
        assert!(changes(&base, &base).is_empty());
        let c = changes(
            &base,
            &cfg("[rate]\nmax_rate = \"256kbit\"\n[log]\nlevel = \"debug\"\n[[policy]]\ntopics = [\"a/#\", \"b/#\"]\npriority = \"low\"\ndegrade = \"latest\"\n"),
        );
        assert_eq!(c.live, ["log.level", "policy", "rate.max_rate"]);
        assert!(c.restart.is_empty(), "{c:?}");
        let c = changes(
            &base,
            &cfg("[rate]\nmax_rate = \"1mbit\"\n[buffer]\nmax_size = \"1GiB\"\n[[policy]]\ntopics = [\"a/#\"]\nstream = \"other\"\n"),
        );
        assert!(c.live.is_empty(), "{c:?}");
        assert_eq!(
            c.restart,
            ["buffer.max_size", "policy (streams or their drain order)"]
        );
        let c = changes(
            &base,
            &cfg("[rate]\nmax_rate = \"1mbit\"\n[[policy]]\ntopics = [\"a/#\"]\npriority = \"low\"\ndrain = \"newest-first\"\n"),
        );
        assert_eq!(c.restart, ["policy (streams or their drain order)"]);
        let c = changes(
            &base,
            &cfg(
                "[[policy]]\ntopics = [\"a/#\"]\npriority = \"low\"\n[metrics]\nlisten = \"off\"\n",
            ),
        );
        assert_eq!(c.live, ["rate.max_rate"], "the cap removed");
        assert_eq!(c.restart, ["metrics.listen"]);
    }
}
