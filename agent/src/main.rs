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
        Command::Run { config } => {
            init_tracing();
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(e),
            };
            match run(config) {
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

fn run(config: Config) -> anyhow::Result<()> {
    // Small gateways: two workers are plenty for I/O-bound relaying, and bound the
    // blocking pool (store reads) so memory stays predictable.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
        edgerelay::run(config, shutdown)
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
