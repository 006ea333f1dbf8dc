use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    match Config::parse(text, Path::new("/etc/edgerelay/test.toml")) {
        Ok(c) => Ok(c),
        Err(ConfigError::Invalid { problems, .. }) => Err(problems),
        Err(e) => panic!("unexpected error {e}"),
    }
}

const MINIMAL: &str = r#"
[agent]
gateway_id = "gw1"
[upstream]
url = "mqtt://127.0.0.1:1883"
"#;

#[test]
fn example_config_is_valid_and_documents_every_key() {
    let text = include_str!("../../../config/edgerelay.toml");
    let c = parse(text).expect("config/edgerelay.toml must validate");
    assert_eq!(c.agent.gateway_id, "gw-example-01");
    assert_eq!(c.sockets.len(), 3);
    assert_eq!(c.upstream.topic_prefix, "edgerelay/gw-example-01");
    // Every key the validator knows appears in the example (commented or not).
    let rendered = c.render();
    for line in rendered.lines().filter(|l| l.contains(" = ")) {
        let key = line.split(" = ").next().unwrap_or_default().trim();
        assert!(
            text.contains(&format!("{key} =")),
            "key {key} is not documented in config/edgerelay.toml"
        );
    }
    for key in ["username", "password_file"] {
        assert!(text.contains(&format!("# {key} =")), "{key} documented");
    }
}

#[test]
fn defaults_fill_in() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(c.buffer.max_size, 512 << 20);
    assert_eq!(c.buffer.max_age, Duration::from_secs(7200));
    assert_eq!(c.buffer.when_full, WhenFull::DropOldest);
    assert_eq!(c.upstream.port, 1883);
    assert_eq!(c.upstream.client_id, "edgerelay-gw1");
    assert_eq!(c.upstream.keep_alive, Duration::from_secs(30));
    assert_eq!(c.upstream.mode, UpstreamMode::Batch);
    assert_eq!(c.compression.dictionary, DictionarySetting::Auto);
    assert!(c.sockets.is_empty());
    assert_eq!(c.agent.worker_threads.get(), 1);
    assert_eq!(c.buffer.commit_linger, Duration::from_millis(20));
}

#[test]
fn link_probe_settings() {
    assert_eq!(
        parse(MINIMAL).expect("valid").link.probe,
        ProbeSetting::Auto
    );
    let with = |v: &str| parse(&format!("{MINIMAL}[link]\nprobe = \"{v}\"\n"));
    for (v, p) in [
        ("ebpf", ProbeSetting::Ebpf),
        ("tcp-info", ProbeSetting::TcpInfo),
        ("off", ProbeSetting::Off),
    ] {
        let c = with(v).expect("valid");
        assert_eq!(c.link.probe, p);
        assert!(c.render().contains(&format!("probe = \"{v}\"")));
    }
    let problems = with("kprobe").expect_err("not an option");
    assert!(
        problems.iter().any(|p| p.key == "link.probe"),
        "{problems:?}"
    );
}

#[test]
fn congestion_control_settings() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(c.upstream.congestion.as_deref(), Some("bbr"));
    let with = |v: &str| {
        parse(&MINIMAL.replace(
            "[upstream]\n",
            &format!("[upstream]\ncongestion = \"{v}\"\n"),
        ))
    };
    let c = with("system").expect("valid");
    assert_eq!(c.upstream.congestion, None);
    assert!(c.render().contains("congestion = \"system\""));
    assert_eq!(
        with("cubic").expect("valid").upstream.congestion.as_deref(),
        Some("cubic")
    );
    for bad in ["", "BBR", "bbr; rm", "a_name_far_too_long"] {
        let problems = with(bad).expect_err(bad);
        assert!(
            problems.iter().any(|p| p.key == "upstream.congestion"),
            "{bad}: {problems:?}"
        );
    }
}

#[test]
fn rate_settings() {
    let c = parse(MINIMAL).expect("valid");
    assert!(c.rate.adapt);
    assert_eq!(c.rate.max_rate_bps, None);
    let with = |body: &str| parse(&format!("{MINIMAL}[rate]\n{body}\n"));
    let c = with("adapt = false\nmax_rate = \"1.5mbit\"").expect("valid");
    assert!(!c.rate.adapt);
    assert_eq!(c.rate.max_rate_bps, Some(1_500_000));
    assert!(c.render().contains("max_rate = \"1500000\""));
    assert_eq!(
        with("max_rate = \"256kbit\"")
            .expect("valid")
            .rate
            .max_rate_bps,
        Some(256_000)
    );
    assert_eq!(
        with("max_rate = \"64000\"")
            .expect("valid")
            .rate
            .max_rate_bps,
        Some(64_000)
    );
    for bad in ["\"fast\"", "\"0mbit\"", "\"-1\"", "\"3 parsecs\""] {
        let problems = with(&format!("max_rate = {bad}")).expect_err(bad);
        assert!(
            problems.iter().any(|p| p.key == "rate.max_rate"),
            "{bad}: {problems:?}"
        );
    }
}

#[test]
fn dictionary_settings() {
    let with = |v: &str| parse(&format!("{MINIMAL}[compression]\ndictionary = {v}\n"));
    let d = |v: &str| with(v).expect("valid").compression.dictionary;
    assert_eq!(d("\"off\""), DictionarySetting::Off);
    assert_eq!(d("\"auto\""), DictionarySetting::Auto);
    assert_eq!(
        d("\"dicts/fleet.dict\""),
        DictionarySetting::File("/etc/edgerelay/dicts/fleet.dict".into()),
        "relative to the config file"
    );
    let c = with("\"/var/lib/fleet.dict\"").expect("valid");
    assert!(c.render().contains("dictionary = \"/var/lib/fleet.dict\""));
    let problems = with("\"\"").expect_err("empty");
    assert!(
        problems.iter().any(|p| p.key == "compression.dictionary"),
        "{problems:?}"
    );
    assert!(with("3").is_err(), "not a string");
}

#[test]
fn three_mistakes_are_all_reported_with_keys_and_lines() {
    let text = r#"
[agent]
gateway_id = "gw1"
colour = "blue"

[buffer]
max_size = "12 parsecs"

[upstream]
url = "mqtt://127.0.0.1:1883"
keep_alive = "forever"
"#;
    let problems = parse(text).expect_err("invalid");
    assert_eq!(problems.len(), 3, "{problems:#?}");
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"agent.colour"), "{keys:?}");
    let size = problems
        .iter()
        .find(|p| p.key == "buffer.max_size")
        .expect("max_size");
    assert_eq!(size.line, Some(7));
    let ka = problems
        .iter()
        .find(|p| p.key == "upstream.keep_alive")
        .expect("keep_alive");
    assert_eq!(ka.line, Some(11));
}

#[test]
fn several_bad_values_in_one_section_are_all_reported() {
    let text = r#"
[agent]
gateway_id = "gw 1"
worker_threads = 0
[buffer]
max_size = "1KiB"
max_age = "soon"
when_full = "panic"
[[socket]]
kind = "sctp"
listen = "nowhere"
topic = "a/+/b"
[upstream]
url = "http://x"
reconnect_min = "1m"
reconnect_max = "1s"
"#;
    let problems = parse(text).expect_err("invalid");
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "agent.gateway_id",
        "agent.worker_threads",
        "buffer.max_size",
        "buffer.max_age",
        "buffer.when_full",
        "socket[0].kind",
        "socket[0].topic",
        "upstream.url",
        "upstream.reconnect_min",
    ] {
        assert!(keys.contains(&k), "missing {k} in {keys:?}");
    }
}

#[test]
fn syntax_error_has_a_line() {
    let problems = parse("[agent]\ngateway_id = \"x\n").expect_err("invalid");
    assert_eq!(problems[0].key, "(syntax)");
    assert_eq!(problems[0].line, Some(2));
}

#[test]
fn missing_sections_and_type_errors() {
    let problems = parse("[buffer]\nmax_size = true\n").expect_err("invalid");
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"agent"), "{keys:?}");
    assert!(keys.contains(&"upstream"), "{keys:?}");
    assert!(keys.contains(&"buffer"), "{keys:?}");
}

#[test]
fn socket_kinds_and_framing() {
    let text = format!(
        "{MINIMAL}\n[[socket]]\nkind = \"udp\"\nlisten = \"127.0.0.1:9\"\ntopic = \"u\"\n\n[[socket]]\nkind = \"unix\"\nlisten = \"run/s.sock\"\nframing = \"length-prefixed\"\ntopic = \"x\"\nack = true\n"
    );
    let c = parse(&text).expect("valid");
    assert_eq!(c.sockets[0].framing, Framing::Datagram);
    assert_eq!(
        c.sockets[1].listen,
        Listen::Unix("/etc/edgerelay/run/s.sock".into())
    );
    assert!(c.sockets[1].ack);

    let bad = format!("{MINIMAL}\n[[socket]]\nkind = \"udp\"\nlisten = \"127.0.0.1:9\"\ntopic = \"u\"\nframing = \"lines\"\nack = true\n");
    let problems = parse(&bad).expect_err("invalid");
    assert_eq!(problems.len(), 2, "{problems:#?}");
}

#[test]
fn secrets_are_masked() {
    let text = format!("{MINIMAL}username = \"u\"\npassword = \"hunter2\"\n");
    let c = parse(&text).expect("valid");
    assert_eq!(
        c.upstream.password.as_ref().map(|p| p.expose()),
        Some("hunter2")
    );
    assert!(!c.render().contains("hunter2"));
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn urls() {
    for (url, host, port) in [
        ("mqtt://a.example", "a.example", 1883),
        ("mqtt://a.example:8883/", "a.example", 8883),
        ("mqtt://[::1]:1884", "::1", 1884),
    ] {
        let c = parse(&MINIMAL.replace("mqtt://127.0.0.1:1883", url)).expect(url);
        assert_eq!((c.upstream.host.as_str(), c.upstream.port), (host, port));
    }
    for bad in ["mqtt://", "mqtt://h:0", "mqtt://u:p@h", "ftp://h", "h:1883"] {
        assert!(
            parse(&MINIMAL.replace("mqtt://127.0.0.1:1883", bad)).is_err(),
            "{bad}"
        );
    }
    // mqtts:// takes 8883 by default and reads its CA file at validation.
    let tls = MINIMAL.replace(
        "url = \"mqtt://127.0.0.1:1883\"",
        "url = \"mqtts://h\"\nca_file = \"/nonexistent/ca.pem\"",
    );
    assert_ne!(tls, MINIMAL);
    let e = format!("{:?}", parse(&tls).expect_err("a missing CA file"));
    assert!(
        e.contains("upstream.ca_file") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
    assert_eq!(
        super::validate::parse_any_url("mqtts://h"),
        Ok(("h".to_owned(), 8883, true))
    );
    let e = parse(&format!(
        "{MINIMAL}\n[local_broker]\nurl = \"mqtts://127.0.0.1\"\ntopics = [\"a\"]\n"
    ))
    .expect_err("TLS to the local broker");
    let e = format!("{e:?}");
    assert!(e.contains("[upstream] only"), "{e}");
}

#[test]
fn local_mqtt_and_local_broker() {
    let c = parse(&format!(
        "{MINIMAL}\n[local_mqtt]\ntopics = [\"sensors/#\"]\n\n[local_broker]\nurl = \"mqtt://127.0.0.1:1884\"\ntopics = [\"a/+\"]\n"
    ))
    .expect("valid");
    let m = c.local_mqtt.expect("local_mqtt");
    assert_eq!(m.listen.to_string(), "127.0.0.1:1883");
    assert!(m.allow_anonymous);
    assert_eq!(m.topics, vec!["sensors/#".to_owned()]);
    let b = c.local_broker.expect("local_broker");
    assert_eq!(
        (b.port, b.client_id.as_str()),
        (1884, "edgerelay-gw1-local")
    );

    let problems = parse(&format!(
        "{MINIMAL}\n[local_mqtt]\nlisten = \"nope\"\ntopics = [\"a/#/b\"]\nmax_packet_size = \"1GiB\"\n\n[local_broker]\nurl = \"mqtt://h\"\n"
    ))
    .expect_err("invalid");
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "local_mqtt.listen",
        "local_mqtt.topics",
        "local_mqtt.max_packet_size",
        "local_broker.topics",
    ] {
        assert!(keys.contains(&k), "missing {k} in {keys:?}");
    }
}

#[test]
fn metrics_and_log_settings() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(
        c.metrics.listen,
        Some("127.0.0.1:9464".parse().expect("addr"))
    );
    assert_eq!(c.metrics.stuck_after, Duration::from_secs(120));
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Text);
    let c = parse(&format!(
        "{MINIMAL}[metrics]\nlisten = \"off\"\nstuck_after = \"30s\"\n[log]\nlevel = \"edgerelay=debug,warn\"\nformat = \"json\"\n"
    ))
    .expect("valid");
    assert_eq!(c.metrics.listen, None);
    assert_eq!(c.metrics.stuck_after, Duration::from_secs(30));
    assert_eq!(c.log.format, LogFormat::Json);
    let rendered = c.render();
    for line in [
        "listen = \"off\"",
        "format = \"json\"",
        "level = \"edgerelay=debug,warn\"",
    ] {
        assert!(rendered.contains(line), "{line} in {rendered}");
    }
    let problems = parse(&format!(
        "{MINIMAL}[metrics]\nlisten = \"everywhere\"\nstuck_after = \"1s\"\n[log]\nlevel = \"info,=[\"\nformat = \"xml\"\n"
    ))
    .expect_err("invalid");
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "metrics.listen",
        "metrics.stuck_after",
        "log.level",
        "log.format",
    ] {
        assert!(keys.contains(&k), "missing {k} in {problems:?}");
    }
}

#[test]
fn policy_settings() {
    use crate::policy::{Degrade, Drain, Priority};
    let c = parse(&format!(
        r#"{MINIMAL}
[[policy]]
topics = ["alarms/#"]
priority = "high"
drain = "newest-first"

[[policy]]
topics = ["sensors/+/temp", "sensors/+/hum"]
priority = "low"
degrade = "sample:30s"

[[policy]]
topics = ["status/#"]
stream = "status"
priority = "low"
degrade = "latest"
"#
    ))
    .expect("valid");
    let list = c.policies.list();
    assert_eq!(list.len(), 3);
    assert_eq!(list[0].stream, "high");
    assert_eq!(list[0].drain, Drain::NewestFirst);
    assert_eq!(list[1].stream, "low");
    assert_eq!(list[1].degrade, Degrade::Sample(Duration::from_secs(30)));
    assert_eq!(list[2].priority, Priority::Low);
    assert_eq!(list[2].degrade, Degrade::Latest);
    let names: Vec<&str> = c
        .policies
        .streams()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["high", "low", "status", "default"]);
    // The effective config shows them and parses back to the same.
    let again = parse(&c.render()).expect("rendered config is valid");
    assert_eq!(again.policies, c.policies);

    let bad = |body: &str, key: &str, needle: &str| {
        let problems = parse(&format!("{MINIMAL}\n{body}\n")).expect_err(body);
        assert!(
            problems
                .iter()
                .any(|p| p.key == key && p.message.contains(needle)),
            "{body}: expected {key} ~ {needle:?}, got {problems:?}"
        );
    };
    bad(
        "[[policy]]\ntopics = [\"a\"]\npriority = \"high\"\ndegrade = \"latest\"",
        "policy[0].degrade",
        "never degraded",
    );
    bad(
        "[[policy]]\ntopics = [\"a\"]\ndegrade = \"sample:soon\"",
        "policy[0].degrade",
        "not a duration",
    );
    bad(
        "[[policy]]\ntopics = [\"a\"]\ndegrade = \"drop\"",
        "policy[0].degrade",
        "sample:INTERVAL",
    );
    bad(
        "[[policy]]\ntopics = [\"a\"]\npriority = \"urgent\"",
        "policy[0].priority",
        "is not one of",
    );
    bad(
        "[[policy]]\npriority = \"low\"",
        "policy[0].topics",
        "is required",
    );
    bad(
        "[[policy]]\ntopics = [\"a/#/b\"]",
        "policy[0].topics",
        "a/#/b",
    );
    bad(
        "[[policy]]\ntopics = [\"a\"]\nstream = \"x/y\"",
        "policy[0].stream",
        "not a stream name",
    );
    bad(
        "[[policy]]\ntopics = [\"a\"]\nstream = \"s\"\n[[policy]]\ntopics = [\"b\"]\nstream = \"s\"\ndrain = \"newest-first\"",
        "policy[1].stream",
        "must agree",
    );
    bad("[policy]\ntopics = [\"a\"]", "policy", "[[policy]]");
}
