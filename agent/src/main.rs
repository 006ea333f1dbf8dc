//! The `edgerelay` binary: parse the CLI, load config, start tracing, run, and map
//! errors to exit codes (0 ok, 1 runtime failure, 2 invalid configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgerelay::config::{Config, ConfigError};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "edgerelay",
    version,
    about = "Store-and-forward MQTT relay for edge gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// If the buffer file is corrupt, move it aside (to buffer.redb.corrupt-TIME),
        /// start with an empty one and report the loss upstream (a `buffer_lost` gap
        /// notice). Without it, a corrupt file stops the agent with an error.
        #[arg(long)]
        repair: bool,
    },
    /// Show the running agent: backlog per stream with drain progress, link quality,
    /// the uplink's rate and state, dead letters (asks its [metrics] endpoint).
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// The status as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Records the central broker refused too often: list them, queue them again, or
    /// purge them (recorded and reported upstream as gaps). With the agent running or
    /// not.
    DeadLetters {
        #[arg(long, short)]
        config: PathBuf,
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Validate a config file: print every error with its key, or the effective config.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Decode one batch payload (a file, or - for standard input) to JSON lines.
    Decode {
        /// The batch; "-" or nothing reads standard input.
        file: Option<PathBuf>,
        /// Where dictionaries are: files named by their 16-hex-digit id (optionally
        /// prefixed "dict-"), as published at {topic_prefix}/dict/{id}.
        #[arg(long)]
        dict_dir: Option<PathBuf>,
    },
    /// Central side: consume gateways' batches from the broker, drop duplicates, print
    /// each record once as a JSON line.
    Unpack {
        /// The central broker, mqtt://host[:port].
        #[arg(long)]
        broker: String,
        /// Output JSON lines on standard output (the default).
        #[arg(long)]
        jsonl: bool,
        /// Instead of JSON lines, republish each record at QoS 1 to this prefix + its
        /// original topic (e.g. "plant/" → "plant/sensors/t1").
        #[arg(long)]
        republish_prefix: Option<String>,
        /// Topic filter of the gateways' topic prefixes.
        #[arg(long, default_value = "edgerelay/+")]
        prefix: String,
        /// The duplicate memory (a small redb file).
        #[arg(long, default_value = "unpack-state.redb")]
        state: PathBuf,
        /// MQTT client id (its session is persistent).
        #[arg(long, default_value = "edgerelay-unpack")]
        client_id: String,
    },
    /// Print a `USER:HASH` line for [local_mqtt] password_file; the password is read
    /// from standard input (first line).
    HashPassword {
        /// The MQTT username.
        user: String,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Print them (stream, seq, topic, size, attempts, why).
    List {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Queue them again, as new records at the end of their streams.
    Retry {
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Which ones, as STREAM:SEQ.
        records: Vec<String>,
    },
    /// Delete them; each run is recorded as a gap (reason "purged") and reported.
    Purge {
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Which ones, as STREAM:SEQ.
        records: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", c.render());
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(e),
        },
        Command::Status { config, json } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(e),
            };
            match status(&config, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edgerelay status: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::DeadLetters { config, action } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(e),
            };
            match dead_letters(&config, action) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edgerelay dead-letters: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Unpack {
            broker,
            jsonl: _,
            republish_prefix,
            prefix,
            state,
            client_id,
        } => {
            init_tracing();
            let output = match republish_prefix {
                Some(p) => edgerelay::central::unpack::Output::Republish(p),
                None => edgerelay::central::unpack::Output::JsonLines,
            };
            match unpack(broker, output, prefix, state, client_id) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edgerelay unpack: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Decode { file, dict_dir } => match decode(file, dict_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("edgerelay decode: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::HashPassword { user } => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("edgerelay: cannot read the password from stdin: {e}");
                return ExitCode::from(1);
            }
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() || user.is_empty() || user.contains(':') {
                eprintln!("edgerelay: need a non-empty user (without ':') and password");
                return ExitCode::from(2);
            }
            match edgerelay::ingest::mqtt::auth::hash_password(password) {
                Ok(hash) => {
                    println!("{user}:{hash}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edgerelay: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run {
            config: path,
            repair,
        } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => return config_failure(e),
            };
            let filter = init_logging(&config.log);
            if repair {
                if let Err(e) = repair_buffer(&config) {
                    tracing::error!("{e:#}");
                    eprintln!("edgerelay: {e:#}");
                    return ExitCode::from(1);
                }
            }
            match run(config, path, filter) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("edgerelay: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `run --repair`, before the agent starts.
fn repair_buffer(config: &Config) -> anyhow::Result<()> {
    let opts = edgerelay::store_options(config);
    match edgerelay::store::Store::repair(&opts).context("--repair")? {
        edgerelay::store::Repair::Healthy => {
            tracing::info!(path = %opts.path.display(), "--repair: the buffer file opens; nothing to repair")
        }
        edgerelay::store::Repair::Replaced { moved_to, detail } => tracing::error!(
            path = %opts.path.display(),
            moved_to = %moved_to.display(),
            problem = %detail,
            "--repair: the buffer file was unreadable; moved aside, started empty, the loss is reported upstream as a buffer_lost gap"
        ),
    }
    Ok(())
}

fn unpack(
    broker: String,
    output: edgerelay::central::unpack::Output,
    prefix: String,
    state: PathBuf,
    client_id: String,
) -> anyhow::Result<()> {
    let (host, port) =
        edgerelay::config::parse_mqtt_url(&broker).map_err(|e| anyhow::anyhow!("--broker: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        let signals = cancel.clone();
        tokio::spawn(async move {
            if wait_for_signal().await.is_ok() {
                signals.cancel();
            }
        });
        let opts = edgerelay::central::unpack::UnpackOptions {
            host,
            port,
            output,
            prefix,
            state,
            client_id,
        };
        let mut out = std::io::stdout();
        edgerelay::central::unpack::run(opts, &mut out, cancel)
            .await
            .context("unpack failed")
    })
}

/// Where the running agent's endpoint answers: its `[metrics] listen`, with an
/// unspecified address (0.0.0.0, ::) asked on loopback.
fn endpoint(config: &Config) -> anyhow::Result<std::net::SocketAddr> {
    // The running agent notes where it listens (the config may say port 0).
    let noted = std::fs::read_to_string(config.agent.data_dir.join(edgerelay::ENDPOINT_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<std::net::SocketAddr>().ok());
    let mut addr = noted.or(config.metrics.listen).ok_or_else(|| {
        anyhow::anyhow!(
            "[metrics] listen is \"off\" in the config: the agent serves its status there"
        )
    })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(addr)
}

/// GET (or POST) `path` on the running agent's endpoint: its answer, or None when the
/// agent is not running (nothing answers there).
fn ask_agent(
    config: &Config,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<Option<(u16, String)>> {
    let addr = endpoint(config)?;
    if addr.port() == 0 {
        // Port 0 configured and no running agent noted its port.
        return Ok(None);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match runtime.block_on(edgerelay::telemetry::http::request(
        addr, method, path, body,
    )) {
        Ok(answer) => Ok(Some(answer)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(None),
        Err(e) => Err(anyhow::anyhow!("asking the agent at {addr}: {e}")),
    }
}

fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let Some((code, body)) = ask_agent(config, "GET", "/status", "")? else {
        anyhow::bail!(
            "edgerelay is not running for this config (nothing answers at {}, its [metrics] listen)",
            endpoint(config)?
        );
    };
    anyhow::ensure!(code == 200, "the agent answered {code}: {body}");
    let status: edgerelay::telemetry::Status = serde_json::from_str(&body)
        .context("the agent's status is not what this edgerelay reads")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render());
    }
    Ok(())
}

fn dead_letters(config: &Config, action: DeadLetterAction) -> anyhow::Result<()> {
    use edgerelay::store::dead::{DeadLetter, Which};
    let which = |all: bool, records: Vec<String>| -> anyhow::Result<Which> {
        if all {
            anyhow::ensure!(records.is_empty(), "--all or STREAM:SEQ, not both");
            return Ok(Which::All);
        }
        anyhow::ensure!(
            !records.is_empty(),
            "name the records (STREAM:SEQ …) or --all"
        );
        records
            .iter()
            .map(|r| {
                let (s, q) = r
                    .rsplit_once(':')
                    .ok_or_else(|| anyhow::anyhow!("{r:?} is not STREAM:SEQ"))?;
                Ok((
                    s.to_owned(),
                    q.parse().with_context(|| format!("{r:?}: the seq"))?,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Which::Some)
    };
    let (path, op, body) = match &action {
        DeadLetterAction::List { .. } => ("/dead-letters", "GET", String::new()),
        DeadLetterAction::Retry { all, records } => (
            "/dead-letters/retry",
            "POST",
            serde_json::to_string(&which(*all, records.clone())?)?,
        ),
        DeadLetterAction::Purge { all, records } => (
            "/dead-letters/purge",
            "POST",
            serde_json::to_string(&which(*all, records.clone())?)?,
        ),
    };
    let answer = match ask_agent(config, op, path, &body)? {
        Some((200, answer)) => answer,
        Some((code, answer)) => anyhow::bail!("the agent answered {code}: {answer}"),
        None => offline_dead_letters(config, &action, &body)?,
    };
    match action {
        DeadLetterAction::List { json: true } => println!("{answer}"),
        DeadLetterAction::List { json: false } => {
            let list: Vec<DeadLetter> = serde_json::from_str(&answer)?;
            if list.is_empty() {
                println!("no dead letters");
            }
            for d in list {
                println!(
                    "{}:{}  {}  {} bytes  {} attempts  {}",
                    d.stream, d.seq, d.topic, d.payload_bytes, d.attempts, d.reason
                );
            }
        }
        _ => println!("{answer}"),
    }
    Ok(())
}

/// The dead-letter command on the buffer file itself (the agent is not running).
fn offline_dead_letters(
    config: &Config,
    action: &DeadLetterAction,
    body: &str,
) -> anyhow::Result<String> {
    let (store, thread) = edgerelay::store::Store::open(edgerelay::store_options(config))
        .context("opening the buffer (the agent is not running)")?;
    let result = (|| -> anyhow::Result<String> {
        Ok(match action {
            DeadLetterAction::List { .. } => serde_json::to_string(
                &store.dead_letters_blocking(edgerelay::telemetry::admin::LIST_LIMIT)?,
            )?,
            DeadLetterAction::Retry { .. } => serde_json::json!({
                "retried": store.retry_dead_letters_blocking(serde_json::from_str(body)?)?
            })
            .to_string(),
            DeadLetterAction::Purge { .. } => serde_json::json!({
                "purged": store.purge_dead_letters_blocking(serde_json::from_str(body)?)?
            })
            .to_string(),
        })
    })();
    drop(store);
    thread.close();
    result
}

fn decode(file: Option<PathBuf>, dict_dir: Option<PathBuf>) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    // No valid batch is larger than its body limit plus header and zstd framing.
    let limit = (edgerelay::wire::MAX_BODY + (1 << 20)) as u64;
    let input: Box<dyn Read> = match file.as_deref() {
        None => Box::new(std::io::stdin()),
        Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdin()),
        Some(p) => {
            Box::new(std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?)
        }
    };
    let mut bytes = Vec::new();
    input
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .context("reading the batch")?;
    anyhow::ensure!(
        bytes.len() as u64 <= limit,
        "input is larger than any valid batch ({limit} bytes)"
    );
    let lookup = |id: u64| {
        let dir = dict_dir.as_ref()?;
        [format!("{id:016x}"), format!("dict-{id:016x}")]
            .iter()
            .find_map(|name| std::fs::read(dir.join(name)).ok())
            .map(edgerelay::wire::Dictionary::new)
            .filter(|d| d.id == id)
    };
    let batch = edgerelay::wire::decode(&bytes, &lookup)?;
    let mut out = std::io::stdout().lock();
    for r in &batch.records {
        match writeln!(out, "{}", edgerelay::wire::record_json(&batch.header, r)) {
            Ok(()) => {}
            // The reader went away (`| head`): not an error of ours.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn config_failure(e: ConfigError) -> ExitCode {
    eprintln!("edgerelay: {e}");
    ExitCode::from(2)
}

/// The handle that changes the log filter of a running agent.
type FilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// The agent's logging: `[log] format`, and the filter from EDGERELAY_LOG if set, else
/// `[log] level`. Returns the handle a reload changes the level with.
fn init_logging(log: &edgerelay::config::LogConfig) -> FilterHandle {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let text = std::env::var("EDGERELAY_LOG").unwrap_or_else(|_| log.level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(&text)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match log.format {
        edgerelay::config::LogFormat::Json => registry.with(fmt.json()).init(),
        edgerelay::config::LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .init(),
    }
    handle
}

/// Log filter from EDGERELAY_LOG (tracing's EnvFilter syntax), default "info".
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGERELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// SIGHUP: read the config file again; an invalid one is reported and changes
/// nothing. The log level is applied here; the rest goes to the agent.
async fn reload_on_hangup(
    path: PathBuf,
    filter: FilterHandle,
    tx: tokio::sync::watch::Sender<std::sync::Arc<Config>>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler: no config reload");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!(path = %path.display(), "SIGHUP: reloading the config");
        let new = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("config reload failed, nothing changed: {e}");
                continue;
            }
        };
        if new.log.level != tx.borrow().log.level {
            match tracing_subscriber::EnvFilter::try_new(&new.log.level) {
                Ok(f) => {
                    if let Err(e) = filter.reload(f) {
                        tracing::error!(error = %e, "cannot change the log level");
                    }
                }
                Err(e) => tracing::error!(error = %e, "log level not changed"),
            }
        }
        tx.send_replace(std::sync::Arc::new(new));
    }
}

fn run(config: Config, path: PathBuf, filter: FilterHandle) -> anyhow::Result<()> {
    // `[agent] worker_threads` (default one: the least CPU per message); the blocking
    // pool (store reads) is bounded so memory stays predictable.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.agent.worker_threads.get())
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = wait_for_signal().await {
                tracing::error!(error = %e, "cannot install signal handlers");
                return;
            }
            signals.cancel();
            // A second signal means "now": everything acknowledged is already on disk.
            if wait_for_signal().await.is_ok() {
                tracing::warn!("second signal: exiting immediately");
                std::process::exit(130);
            }
        });
        let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(config.clone()));
        tokio::spawn(reload_on_hangup(path, filter, tx));
        edgerelay::run_with_reload(config, shutdown, Some(rx))
            .await
            .context("edgerelay stopped on an error")
    })
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
