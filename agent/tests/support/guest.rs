//! The shared tiny real Linux test guest (`tests/guest/`): the host's Debian kernel and a busybox
//! initramfs whose init reports on the serial console what the guest itself sees. This module
//! builds it once, gives the kernel command line, reads the console, and serializes QEMU-booting
//! tests across test binaries (the machine has 2 cores and TCG boots slowly under load).
//!
//! Console protocol (written by `tests/guest/init`):
//! - `PLASMAVMC-GUEST-READY` once, drivers loaded;
//! - `PLASMAVMC-GUEST-STATE cpus=0-1 memkib=N blk=vda:SERIAL,... net=eth0:MAC,... pci=ADDR:VENDOR:DEVICE,...`
//!   at start and whenever something changed, so the latest line is the guest's current view;
//! - `PLASMAVMC-GUEST-BLKSIZE vda:SECTORS,...` likewise for block device sizes;
//! - once each: `PLASMAVMC-GUEST-CREDENTIAL NAME sha256=HEX` (fw_cfg credentials),
//!   `PLASMAVMC-GUEST-SEED dev=vdX files=.. user-data-sha256=HEX` (the cloud-init seed) and
//!   `PLASMAVMC-GUEST-WROTE vdX` (after writing to the disk `plasmavmc.write=SERIAL` names);
//! - `PLASMAVMC-GUEST-POWEROFF` when it powers off on the ACPI power button;
//! - `HB:<uptime>` every 0.2 s when the kernel command line has `plasmavmc.heartbeat`.
//!
//! The guest also runs a root shell on the console (prompt `PROMPT`).
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

/// Printed once by the guest's init when its drivers are loaded.
pub const READY: &str = "PLASMAVMC-GUEST-READY";
/// Prefix of the guest's state lines.
pub const STATE: &str = "PLASMAVMC-GUEST-STATE ";
/// Printed by the guest's init when it powers off on the ACPI power button.
pub const POWEROFF: &str = "PLASMAVMC-GUEST-POWEROFF";
/// The prompt of the guest's console shell (in `/`).
pub const PROMPT: &str = "plasmavmc-guest:/# ";
/// Kernel command line flag: the guest ignores the ACPI power button (`system_powerdown`), so a
/// stop runs into its timeout and a soft reset falls back to a hard one.
pub const IGNORE_POWERDOWN: &str = "plasmavmc.ignore_powerdown";
/// Kernel command line flag: the guest prints `HEARTBEAT` and its uptime every 0.2 s.
pub const HEARTBEAT_FLAG: &str = "plasmavmc.heartbeat";
/// Prefix of the guest's heartbeat lines (`HB:<uptime seconds>`).
pub const HEARTBEAT: &str = "HB:";
/// Prefix of the guest's block size lines (`vda:SECTORS,...`, 512-byte sectors).
pub const BLKSIZE: &str = "PLASMAVMC-GUEST-BLKSIZE ";
/// A TCG boot to `READY` on a loaded 2-core machine (~6 s idle); generous on purpose.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Kernel and initramfs of the test guest.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate lives in the repository")
        .to_path_buf()
}

fn lock(path: &Path) -> Flock<File> {
    std::fs::create_dir_all(path.parent().unwrap()).expect("target dir");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Flock::lock(file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("flock {}: {e}", path.display()))
}

/// Builds the guest (once per process; `tests/guest/build.sh` itself is cached across runs) into
/// `<repo>/target/test-guest/`. Panics with the script's message (naming the missing Debian
/// package) when it cannot be built.
pub fn guest_artifacts() -> GuestArtifacts {
    static BUILT: OnceLock<GuestArtifacts> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root();
            let out = root.join("target/test-guest");
            let _build = lock(&root.join("target/test-guest.lock"));
            let output = Command::new("sh")
                .arg(root.join("tests/guest/build.sh"))
                .arg(&out)
                .output()
                .expect("running tests/guest/build.sh");
            assert!(
                output.status.success(),
                "tests/guest/build.sh failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
            GuestArtifacts {
                kernel: out.join("vmlinuz"),
                initrd: out.join("initramfs.cpio.gz"),
            }
        })
        .clone()
}

/// The guest's kernel command line. `ignore_unplug`: the guest never answers PCI unplug requests
/// (`device_del` gets no `DEVICE_DELETED`, the device stays until a reset), for testing stuck
/// unplugs. That guest still sees hot-added PCI devices on q35's default ACPI hotplug (its init
/// rescans the bus), and vCPU and memory hotplug work as usual. Either guest powers off on the
/// ACPI power button unless `IGNORE_POWERDOWN` is added.
pub fn guest_cmdline(ignore_unplug: bool) -> String {
    let mut cmdline = "console=ttyS0 quiet panic=-1".to_owned();
    if ignore_unplug {
        // No PCI hotplug driver at all: acpiphp serves q35's default ACPI hotplug, pciehp (off
        // with pcie_ports=compat) native PCIe hotplug. See tests/guest/build.sh.
        cmdline.push_str(" acpiphp.disable=1 pcie_ports=compat");
    }
    cmdline
}

/// `guest_cmdline(false)` for a guest that ignores the ACPI power button.
pub fn guest_cmdline_ignoring_powerdown() -> String {
    format!("{} {IGNORE_POWERDOWN}", guest_cmdline(false))
}

/// Serializes QEMU-booting tests across all test binaries and threads; hold the guard for the
/// whole test.
pub fn qemu_test_lock() -> impl Drop {
    lock(&repo_root().join("target/qemu-tests.lock"))
}

/// What the guest reported in its latest `PLASMAVMC-GUEST-STATE` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestState {
    /// Number of online CPUs.
    pub online_cpus: usize,
    /// The kernel's online CPU list, e.g. `0-1,3`.
    pub cpus: String,
    /// `MemTotal` in KiB.
    pub mem_kib: u64,
    /// Block device name (`vda`) -> serial (empty when none).
    pub blocks: BTreeMap<String, String>,
    /// Interface name (`eth0`) -> MAC address.
    pub nics: BTreeMap<String, String>,
    /// PCI functions as `domain:bus:dev.fn:vendor:device`, e.g. `0000:01:00.0:1af4:1042`.
    pub pci: Vec<String>,
}

impl GuestState {
    /// Parses one state line (with or without the `PLASMAVMC-GUEST-STATE ` prefix).
    pub fn parse(line: &str) -> Result<GuestState, String> {
        let body = line
            .trim()
            .strip_prefix(STATE.trim_end())
            .unwrap_or(line)
            .trim();
        let mut fields = BTreeMap::new();
        for field in body.split(' ').filter(|f| !f.is_empty()) {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| format!("state field without '=': {field:?} in {line:?}"))?;
            fields.insert(key, value);
        }
        let field = |key: &str| {
            fields
                .get(key)
                .copied()
                .ok_or_else(|| format!("state line without {key}=: {line:?}"))
        };
        let cpus = field("cpus")?.to_owned();
        Ok(GuestState {
            online_cpus: count_cpu_list(&cpus).map_err(|e| format!("{e} in {line:?}"))?,
            cpus,
            mem_kib: field("memkib")?
                .parse()
                .map_err(|e| format!("memkib: {e} in {line:?}"))?,
            blocks: named_list(field("blk")?, line)?,
            nics: named_list(field("net")?, line)?,
            pci: list(field("pci")?).map(str::to_owned).collect(),
        })
    }

    /// The last complete state line in console output, parsed.
    pub fn latest(console: &str) -> Option<Result<GuestState, String>> {
        complete_lines(console)
            .filter_map(|l| l.find(STATE).map(|at| &l[at..]))
            .last()
            .map(GuestState::parse)
    }
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').filter(|item| !item.is_empty())
}

/// `vda:SERIAL,eth0:52:54:...`: the name ends at the first ':'.
fn named_list(value: &str, line: &str) -> Result<BTreeMap<String, String>, String> {
    list(value)
        .map(|item| {
            item.split_once(':')
                .map(|(name, v)| (name.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("{item:?} is not name:value in {line:?}"))
        })
        .collect()
}

/// Counts a kernel CPU list such as `0-2,5`.
fn count_cpu_list(cpus: &str) -> Result<usize, String> {
    let number = |n: &str| {
        n.parse::<usize>()
            .map_err(|e| format!("bad CPU list {cpus:?}: {e}"))
    };
    list(cpus)
        .map(|range| match range.split_once('-') {
            Some((first, last)) => Ok(number(last)? + 1 - number(first)?),
            None => number(range).map(|_| 1),
        })
        .sum()
}

/// Lines terminated by a newline: the guest may be mid-way through writing the last one.
fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete.lines()
}

/// The guest's serial console, as QEMU writes it to a file (`consoleLog`).
pub struct Console {
    path: PathBuf,
}

impl Console {
    pub fn new(path: impl Into<PathBuf>) -> Console {
        Console { path: path.into() }
    }

    fn text(&self) -> String {
        std::fs::read(&self.path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last 3000 bytes of the console, for error messages.
    pub fn tail(&self) -> String {
        let text = self.text();
        let mut start = text.len().saturating_sub(3000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_owned()
    }

    /// Waits (blocking, polling every 100 ms) until `needle` appears anywhere on the console.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        self.poll(timeout, || self.text().contains(needle).then_some(()))
            .ok_or_else(|| self.timed_out(&format!("{needle:?}"), timeout))
    }

    /// Waits (blocking) until the guest's latest state satisfies `predicate`; returns that state.
    pub fn wait_for_state(
        &self,
        predicate: impl Fn(&GuestState) -> bool,
        timeout: Duration,
    ) -> Result<GuestState, String> {
        let mut bad_line = None;
        let found = self.poll(timeout, || match GuestState::latest(&self.text())? {
            Ok(state) => predicate(&state).then_some(state),
            Err(e) => {
                bad_line = Some(e);
                None
            }
        });
        found.ok_or_else(|| match bad_line {
            Some(e) => format!(
                "unparseable guest state: {e}\n{}",
                self.timed_out("", timeout)
            ),
            None => self.timed_out("the expected guest state", timeout),
        })
    }

    /// Waits until the latest complete line starting with `prefix` satisfies `predicate`; returns
    /// it without the prefix.
    pub fn wait_for_latest(
        &self,
        prefix: &str,
        predicate: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        self.poll(timeout, || {
            let text = self.text();
            let line = complete_lines(&text)
                .filter_map(|l| l.find(prefix).map(|at| &l[at + prefix.len()..]))
                .last()?
                .to_owned();
            predicate(&line).then_some(line)
        })
        .ok_or_else(|| self.timed_out(&format!("matching {prefix:?} line"), timeout))
    }

    /// Waits until the guest reports block device `name` with `sectors` 512-byte sectors.
    pub fn wait_for_block_size(
        &self,
        name: &str,
        sectors: u64,
        timeout: Duration,
    ) -> Result<(), String> {
        let wanted = format!("{name}:{sectors}");
        self.wait_for_latest(
            BLKSIZE,
            |line| line.split(',').any(|item| item == wanted),
            timeout,
        )
        .map(drop)
    }

    /// The guest's latest state, if it reported one.
    pub fn state(&self) -> Option<Result<GuestState, String>> {
        GuestState::latest(&self.text())
    }

    fn poll<T>(&self, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check() {
                return Some(found);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn timed_out(&self, what: &str, timeout: Duration) -> String {
        format!(
            "no {what} on the guest console {} within {timeout:?}; its tail:\n{}",
            self.path.display(),
            self.tail()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "PLASMAVMC-GUEST-STATE cpus=0-1,3 memkib=250000 blk=vda:root-serial,vdb: \
        net=eth0:52:54:00:12:34:56 pci=0000:00:00.0:8086:29c0,0000:01:00.0:1af4:1042";

    #[test]
    fn parses_every_field() {
        let state = GuestState::parse(LINE).unwrap();
        assert_eq!(state.online_cpus, 3);
        assert_eq!(state.cpus, "0-1,3");
        assert_eq!(state.mem_kib, 250000);
        assert_eq!(
            state.blocks,
            BTreeMap::from([
                ("vda".to_owned(), "root-serial".to_owned()),
                ("vdb".to_owned(), String::new())
            ])
        );
        assert_eq!(
            state.nics,
            BTreeMap::from([("eth0".to_owned(), "52:54:00:12:34:56".to_owned())])
        );
        assert_eq!(
            state.pci,
            ["0000:00:00.0:8086:29c0", "0000:01:00.0:1af4:1042"]
        );
    }

    #[test]
    fn empty_lists_are_empty() {
        let state = GuestState::parse("cpus=0 memkib=1 blk= net= pci=").unwrap();
        assert_eq!(state.online_cpus, 1);
        assert!(state.blocks.is_empty() && state.nics.is_empty() && state.pci.is_empty());
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        let missing = GuestState::parse("cpus=0 blk= net= pci=").unwrap_err();
        assert!(missing.contains("memkib"), "{missing}");
        let bad_cpus = GuestState::parse("cpus=0-x memkib=1 blk= net= pci=").unwrap_err();
        assert!(bad_cpus.contains("CPU list"), "{bad_cpus}");
        let bad_blk = GuestState::parse("cpus=0 memkib=1 blk=vda net= pci=").unwrap_err();
        assert!(bad_blk.contains("name:value"), "{bad_blk}");
    }

    #[test]
    fn latest_takes_the_last_complete_line() {
        let console = format!(
            "[    1.0] kernel noise\nPLASMAVMC-GUEST-READY\n{}\n{}\nPLASMAVMC-GUEST-STATE cpus=0-3 mem",
            "PLASMAVMC-GUEST-STATE cpus=0 memkib=1 blk= net= pci=",
            "PLASMAVMC-GUEST-STATE cpus=0-1 memkib=2 blk= net= pci="
        );
        let state = GuestState::latest(&console).unwrap().unwrap();
        assert_eq!((state.online_cpus, state.mem_kib), (2, 2));
        assert!(GuestState::latest("PLASMAVMC-GUEST-READY\n").is_none());
    }
}
