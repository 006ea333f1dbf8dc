//! linklab: reproducible degraded links between network namespaces, for edgerelay's
//! tests and benchmarks (not part of the agent).
//!
//! ```text
//!  gateway ns                link ns                         central ns
//!  lab0 10.77.0.1 ── veth ── tog  [user-space link]  toc ── veth ── lab0 10.77.0.2
//! ```
//!
//! Why user space: the CI kernel has no netem (nor fq, prio, sfq), and a TCP proxy
//! would hide the path from the agent's own socket. Here the agent's TCP connection
//! crosses a real L2 path whose frames are delayed, lost, rate-limited (bounded queue,
//! tail drop) or blackholed by `model::LinkModel`, per direction, so the kernel's TCP
//! sees real RTTs, retransmissions and stalls.
//!
//! Invariants: a lab touches only the namespaces it created (names `erlab-<pid>-<n>-…`,
//! unique per process and lab, so tests run in parallel) and the addresses inside them;
//! everything is removed on drop, also when a test panics; labs left by a killed process
//! are removed by the next lab created. Needs root: `Lab::start` says so otherwise.

#![deny(unsafe_code)]

mod forward;
pub mod model;
pub mod spec;
mod sys;

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use forward::Stats;
pub use model::Conditions;
pub use sys::{is_root, TcpInfo};

/// TCP_INFO of a connected TCP socket (what the kernel measured: RTT, retransmissions).
pub fn tcp_info(socket: &impl std::os::fd::AsFd) -> std::io::Result<TcpInfo> {
    sys::tcp_info(socket.as_fd())
}

/// The gateway's address inside its namespace (the same in every lab: each lab's
/// namespaces are its own).
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The central side's address.
pub const CENTRAL_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PREFIX: &str = "erlab-";
const IFACE: &str = "lab0";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the link lab needs root (it creates network namespaces): run the tests as root, e.g. `sudo scripts/test.sh`")]
    NotRoot,
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("link lab: {0}")]
    Io(#[from] std::io::Error),
}

/// Which end of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Gateway,
    Central,
}

/// Which way frames travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Gateway → central.
    Up,
    /// Central → gateway.
    Down,
}

/// Byte and packet counters of an interface (/sys/class/net/IF/statistics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// How a lab starts.
#[derive(Debug, Clone, Default)]
pub struct LabBuilder {
    up: Conditions,
    down: Conditions,
    seed: u64,
}

impl LabBuilder {
    pub fn up(mut self, c: Conditions) -> Self {
        self.up = c;
        self
    }
    pub fn down(mut self, c: Conditions) -> Self {
        self.down = c;
        self
    }
    /// The same conditions both ways.
    pub fn both(self, c: Conditions) -> Self {
        self.up(c.clone()).down(c)
    }
    /// Seed of the loss and jitter draws (the down direction uses seed + 1).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn start(self) -> Result<Lab, LabError> {
        Lab::start(self)
    }
}

/// A running lab; dropping it removes everything it created.
#[derive(Debug)]
pub struct Lab {
    names: Names,
    up: Arc<forward::Direction>,
    down: Arc<forward::Direction>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// The lab's namespaces; dropping removes them (so a half-built lab is cleaned up too).
#[derive(Debug)]
struct Names {
    gateway: String,
    link: String,
    central: String,
    created: Vec<String>,
}

impl Drop for Names {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| LabError::Command {
            command: command.clone(),
            detail: if e.kind() == std::io::ErrorKind::NotFound {
                format!("{program} is not installed (scripts/deps.sh installs it)")
            } else {
                e.to_string()
            },
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Remove labs whose creating process is gone (it was killed before its drop ran).
pub fn remove_stale() -> Result<Vec<String>, LabError> {
    let mut removed = Vec::new();
    for line in run("ip", &["netns", "list"])?.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            run("ip", &["netns", "del", name])?;
            removed.push(name.to_owned());
        }
    }
    Ok(removed)
}

impl Lab {
    pub fn builder() -> LabBuilder {
        LabBuilder::default()
    }

    fn start(b: LabBuilder) -> Result<Lab, LabError> {
        if !sys::is_root() {
            return Err(LabError::NotRoot);
        }
        remove_stale()?;
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut names = Names {
            gateway: format!("{id}-gw"),
            link: format!("{id}-link"),
            central: format!("{id}-cen"),
            created: Vec::new(),
        };
        for ns in [
            names.gateway.clone(),
            names.link.clone(),
            names.central.clone(),
        ] {
            run("ip", &["netns", "add", &ns])?;
            names.created.push(ns.clone());
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (gw, link, cen) = (&names.gateway, &names.link, &names.central);
        for (ns, peer) in [(gw, "tog"), (cen, "toc")] {
            run(
                "ip",
                &[
                    "link", "add", IFACE, "netns", ns, "type", "veth", "peer", "name", peer,
                    "netns", link,
                ],
            )?;
        }
        // Real-sized frames with real checksums: no segmentation or checksum offload
        // on any end, or the forwarder would see 64 KB super-frames and unfinished sums.
        for (ns, ifname) in [(gw, IFACE), (cen, IFACE), (link, "tog"), (link, "toc")] {
            run(
                "ip",
                &[
                    "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "off", "rx", "off", "tso",
                    "off", "gso", "off", "gro", "off",
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", ifname, "up"])?;
        }
        run(
            "ip",
            &[
                "-n",
                gw,
                "addr",
                "add",
                &format!("{GATEWAY_ADDR}/24"),
                "dev",
                IFACE,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                cen,
                "addr",
                "add",
                &format!("{CENTRAL_ADDR}/24"),
                "dev",
                IFACE,
            ],
        )?;
        // Static neighbours: no ARP to lose or delay; every frame is the IP traffic.
        let mac = |ns: &str| -> Result<String, LabError> {
            let out = run("ip", &["-n", ns, "-br", "link", "show", "dev", IFACE])?;
            out.split_whitespace()
                .nth(2)
                .map(str::to_owned)
                .ok_or_else(|| LabError::Command {
                    command: format!("ip -n {ns} -br link show dev {IFACE}"),
                    detail: format!("no MAC address in {out:?}"),
                })
        };
        let (gw_mac, cen_mac) = (mac(gw)?, mac(cen)?);
        run(
            "ip",
            &[
                "-n",
                gw,
                "neigh",
                "replace",
                &CENTRAL_ADDR.to_string(),
                "lladdr",
                &cen_mac,
                "dev",
                IFACE,
                "nud",
                "permanent",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                cen,
                "neigh",
                "replace",
                &GATEWAY_ADDR.to_string(),
                "lladdr",
                &gw_mac,
                "dev",
                IFACE,
                "nud",
                "permanent",
            ],
        )?;

        let link_ns = link.clone();
        let sockets = std::thread::spawn(move || -> std::io::Result<_> {
            sys::enter_netns(&link_ns)?;
            let tog = sys::PacketSocket::open("tog", Duration::from_millis(50))?;
            let toc = sys::PacketSocket::open("toc", Duration::from_millis(50))?;
            Ok((Arc::new(tog), Arc::new(toc)))
        })
        .join()
        .map_err(|_| std::io::Error::other("opening the forwarder's sockets panicked"))??;
        let (tog, toc) = sockets;
        let up = Arc::new(forward::Direction::new(b.up, b.seed));
        let down = Arc::new(forward::Direction::new(b.down, b.seed.wrapping_add(1)));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads =
            forward::spawn("lab-up", tog.clone(), toc.clone(), up.clone(), stop.clone())?;
        threads.extend(forward::spawn(
            "lab-down",
            toc,
            tog,
            down.clone(),
            stop.clone(),
        )?);
        Ok(Lab {
            names,
            up,
            down,
            stop,
            threads,
        })
    }

    /// Name of a side's namespace (for `ip netns exec`).
    pub fn namespace(&self, side: Side) -> &str {
        match side {
            Side::Gateway => &self.names.gateway,
            Side::Central => &self.names.central,
        }
    }

    /// Address of a side, as the other side reaches it.
    pub fn addr(&self, side: Side) -> Ipv4Addr {
        match side {
            Side::Gateway => GATEWAY_ADDR,
            Side::Central => CENTRAL_ADDR,
        }
    }

    /// A command that runs `program` inside a side's namespace.
    pub fn command(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.namespace(side)]).arg(program);
        c
    }

    /// Run `f` on a thread inside a side's namespace: sockets it creates live there
    /// (and stay there when handed to other threads).
    pub fn run_in<T: Send + 'static>(
        &self,
        side: Side,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, LabError> {
        let ns = self.namespace(side).to_owned();
        std::thread::spawn(move || -> std::io::Result<T> {
            sys::enter_netns(&ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| std::io::Error::other("a closure run in the lab panicked"))?
        .map_err(LabError::from)
    }

    fn direction(&self, dir: Dir) -> &forward::Direction {
        match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        }
    }

    pub fn conditions(&self, dir: Dir) -> Conditions {
        self.direction(dir).conditions()
    }

    /// Change one direction's conditions at run time.
    pub fn set(&self, dir: Dir, c: Conditions) {
        self.direction(dir).set(c);
    }

    pub fn set_both(&self, c: Conditions) {
        self.set(Dir::Up, c.clone());
        self.set(Dir::Down, c);
    }

    /// Switch the blackhole on or off, both ways, keeping the other conditions.
    pub fn outage(&self, on: bool) {
        for dir in [Dir::Up, Dir::Down] {
            let mut c = self.conditions(dir);
            c.outage = on;
            self.set(dir, c);
        }
    }

    /// What the forwarder did in one direction.
    pub fn stats(&self, dir: Dir) -> Stats {
        self.direction(dir).stats()
    }

    /// Counters of a side's interface, from /sys/class/net/lab0/statistics.
    pub fn counters(&self, side: Side) -> Result<Counters, LabError> {
        let base = format!("/sys/class/net/{IFACE}/statistics");
        let files =
            ["rx_bytes", "tx_bytes", "rx_packets", "tx_packets"].map(|f| format!("{base}/{f}"));
        let mut args = vec!["netns", "exec", self.namespace(side), "cat"];
        args.extend(files.iter().map(String::as_str));
        let out = run("ip", &args)?;
        let v: Vec<u64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
        match v[..] {
            [rx_bytes, tx_bytes, rx_packets, tx_packets] => Ok(Counters {
                rx_bytes,
                tx_bytes,
                rx_packets,
                tx_packets,
            }),
            _ => Err(LabError::Command {
                command: format!("cat {base}/*"),
                detail: format!("unexpected output {out:?}"),
            }),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // `names` drops next and deletes the namespaces (and with them the veths).
    }
}
