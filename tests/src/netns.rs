//! Several "hosts" on one machine: a network namespace per host, all on one bridge
//! (itself in a namespace of its own), with addresses the test gives them. Nothing
//! is added to the machine's own network namespace, so nothing a test does here can
//! reach (or be reached from) outside it, and two tests never share a namespace.
//!
//! A process runs on a host under [`Lan::wrapper`] (`ip netns exec NS`); test code
//! runs on a host with [`Lan::spawn_in`] (a thread of its own that enters the
//! namespace: a thread's network namespace is its own). [`Lan::cut`] takes a host's
//! link down and [`Lan::restore`] brings it back: a partition. Every namespace is
//! deleted on drop (drop the processes first: declare the [`Lan`] before them).

use std::ffi::OsString;
use std::future::Future;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The subnet every [`Lan`] uses (each in namespaces of its own, so they never meet).
const SUBNET: [u8; 3] = [10, 77, 0];

/// One bridge and the hosts on it.
#[derive(Debug)]
pub struct Lan {
    bridge_ns: String,
    hosts: Vec<(String, String, Ipv4Addr)>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Lan {
    /// Hosts named `names`, at 10.77.0.1, .2, … in that order.
    pub fn new(names: &[&str]) -> Lan {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "fleet-t{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut lan = Lan {
            bridge_ns: format!("{prefix}-lan"),
            hosts: Vec::new(),
        };
        if let Err(e) = lan.build(&prefix, names) {
            panic!(
                "cannot build the test network (network namespaces need root and iproute2): {e}"
            );
        }
        lan
    }

    fn build(&mut self, prefix: &str, names: &[&str]) -> Result<(), String> {
        let lan = self.bridge_ns.clone();
        ip(&["netns", "add", &lan])?;
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lan, "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{prefix}-{i}");
            let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], i as u8 + 1);
            ip(&["netns", "add", &ns])?;
            self.hosts.push((name.to_string(), ns.clone(), addr));
            let port = format!("p{i}");
            ip(&[
                "-n", &lan, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &lan, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &lan, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn host(&self, name: &str) -> &(String, String, Ipv4Addr) {
        self.hosts
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no host {name:?} on this test network"))
    }

    /// The host's address.
    pub fn addr(&self, name: &str) -> Ipv4Addr {
        self.host(name).2
    }

    /// The host's namespace name.
    pub fn ns(&self, name: &str) -> &str {
        &self.host(name).1
    }

    /// `ip netns exec NS`: a command prefix that runs a program on the host.
    pub fn wrapper(&self, name: &str) -> Vec<OsString> {
        ["ip", "netns", "exec", self.ns(name)]
            .into_iter()
            .map(OsString::from)
            .collect()
    }

    /// Takes the host's link down: nothing gets in or out (a partition).
    pub fn cut(&self, name: &str) {
        ip(&["-n", self.ns(name), "link", "set", "eth0", "down"]).expect("link down");
    }

    /// Brings the host's link back up.
    pub fn restore(&self, name: &str) {
        ip(&["-n", self.ns(name), "link", "set", "eth0", "up"]).expect("link up");
    }

    /// Runs `f` on a thread of its own inside the host's namespace, on a
    /// current-thread tokio runtime; every socket it opens is the host's.
    pub fn spawn_in<F, Fut, T>(&self, name: &str, f: F) -> std::thread::JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.ns(name));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("enter {path}: {e}"));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(f())
        })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for (_, ns, _) in &self.hosts {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["netns", "del", &self.bridge_ns]);
    }
}
