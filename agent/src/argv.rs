//! The QEMU command line for a VM spec: a plain argv, never a shell string.
//!
//! Choices worth knowing:
//! - vCPUs: `-smp V,maxcpus=M,sockets=1,cores=M,threads=1`. An explicit topology keeps the
//!   hotpluggable slots (`query-hotpluggable-cpus`: socket 0, cores 0..M, thread 0) the same
//!   across QEMU versions, whose default topology has changed before.
//! - Memory: boot memory is `memoryMiB` at launch. With `maxMemoryMiB` above it, a virtio-mem
//!   device backed by `maxMemoryMiB - memoryMiB` of RAM starts empty; live changes move within
//!   [boot memory, maxMemoryMiB]. Going below the boot memory waits for the next boot.
//! - q35: every disk and NIC sits behind its own `pcie-root-port` (so cold-plugged devices can be
//!   unplugged too), plus `hotplugSlots` empty ports. Ports are packed 8 per slot of pcie.0 as
//!   multifunction devices, from slot 2. pc: devices go on pci.0 where QEMU puts them.
//! - Firmware is loaded with `-bios` (works for SeaBIOS and for OVMF images with built-in
//!   variables; variables do not persist).
//! - No `-daemonize`, no `-pidfile`: the shell detaches QEMU and writes the pidfile itself.
//! - QEMU's seccomp filter (`SANDBOX`) is always on: no exec, no fork, no set*id, no scheduler
//!   or priority changes, no obsolete syscalls, whatever a guest makes QEMU do.
//! - Credentials and the cloud-init seed are read by QEMU from descriptors the agent passes at
//!   launch (`/dev/fd/N`, memfds: see `PassedFds`), never from a host file or the argv (which
//!   every local user can read in `/proc/PID/cmdline`). Credentials go to fw_cfg as
//!   `opt/io.systemd.credentials/NAME`; the seed is a read-only virtio-blk disk with serial
//!   `cidata` on the root bus (not hot-pluggable, no root port taken).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::RawFd;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::devices::{self, DeviceProps, DiskBacking};
use crate::ids;
use crate::migration::Layout;
use crate::paths::VmDir;
use crate::spec::{Accel, Machine, VmSpec};

/// Root ports per PCI slot (functions 0..7 of one multifunction slot).
const PORTS_PER_SLOT: u32 = 8;
/// First slot of pcie.0 used for root ports (0 is the host bridge, 1 is left to QEMU).
const FIRST_PORT_SLOT: u32 = 2;

/// `-sandbox`: QEMU's seccomp filter. Hotplug of disks, NICs (on pre-made taps, `script=no`),
/// vCPUs and memory needs none of what it denies.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// fw_cfg file names systemd reads credentials from (`opt/io.systemd.credentials/NAME`).
pub const CREDENTIAL_FW_CFG_PREFIX: &str = "opt/io.systemd.credentials/";

/// Descriptors QEMU inherits at launch, each holding one file's content: the credentials (by
/// name) and the cloud-init seed image. The shell fills it (`qemu::passed`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassedFds {
    pub credentials: BTreeMap<String, RawFd>,
    pub seed: Option<RawFd>,
}

/// QEMU's arguments (without the program itself) to boot `spec` as VM `name`; disks whose path
/// is in `block_devices` are opened as block devices (the shell `stat`s the paths); credentials
/// and the seed are read from `passed`.
pub fn qemu_argv(
    name: &str,
    spec: &VmSpec,
    vm_dir: &VmDir,
    block_devices: &BTreeSet<PathBuf>,
    passed: &PassedFds,
) -> Vec<String> {
    qemu_argv_laid_out(
        name,
        spec,
        &Layout::default(),
        vm_dir,
        block_devices,
        passed,
    )
}

/// `qemu_argv` with devices where `layout` puts them (a migration target reproducing the
/// source's running device tree: see `migration::running`). Devices `layout` does not place
/// go where a boot puts them.
pub fn qemu_argv_laid_out(
    name: &str,
    spec: &VmSpec,
    layout: &Layout,
    vm_dir: &VmDir,
    block_devices: &BTreeSet<PathBuf>,
    passed: &PassedFds,
) -> Vec<String> {
    let mut argv = Argv::default();
    argv.push("-name", format!("guest={},debug-threads=on", escape(name)));
    let machine = match spec.machine {
        Machine::Q35 => "q35",
        Machine::Pc => "pc",
    };
    let (accel, cpu) = match spec.accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    argv.push("-machine", format!("{machine},accel={accel}"));
    argv.flags(&["-nodefaults", "-no-user-config", "-display", "none"]);
    argv.push("-sandbox", SANDBOX);
    argv.push("-cpu", cpu);
    let max_vcpus = spec.effective_max_vcpus();
    argv.push(
        "-smp",
        format!(
            "{},maxcpus={max_vcpus},sockets=1,cores={max_vcpus},threads=1",
            spec.vcpus
        ),
    );
    push_memory(&mut argv, spec, layout);
    push_boot(&mut argv, spec);
    push_devices(&mut argv, name, spec, layout, block_devices);
    push_passed(&mut argv, passed);
    push_console_and_monitor(&mut argv, spec, vm_dir);
    argv.0
}

fn push_passed(argv: &mut Argv, passed: &PassedFds) {
    for (name, fd) in &passed.credentials {
        argv.push(
            "-fw_cfg",
            format!(
                "name={},file=/dev/fd/{fd}",
                escape(&format!("{CREDENTIAL_FW_CFG_PREFIX}{name}"))
            ),
        );
    }
    if let Some(fd) = passed.seed {
        argv.push("-blockdev", keyval_blockdev(&devices::seed_file_node(fd)));
        argv.push("-blockdev", keyval_blockdev(&devices::seed_format_node()));
        argv.push("-device", keyval_device(&devices::seed_device()));
    }
}

/// The PCIe root port a cold-plugged device sits on, or `None` where QEMU picks (pc).
/// Disks (by id) come first, then NICs (by id); see `qemu_argv`.
fn cold_plug_bus(spec: &VmSpec, index: usize) -> Option<String> {
    (spec.machine == Machine::Q35).then(|| ids::root_port(index as u32))
}

/// Number of root ports created at boot on q35: one per declared device, plus the free ones.
pub fn root_port_count(spec: &VmSpec) -> u32 {
    match spec.machine {
        Machine::Q35 => (spec.disks.len() + spec.nics.len()) as u32 + spec.hotplug_slots,
        Machine::Pc => 0,
    }
}

fn push_memory(argv: &mut Argv, spec: &VmSpec, layout: &Layout) {
    let boot = spec.memory_mib;
    match spec.max_memory_mib.filter(|&max| max > boot) {
        None => argv.push("-m", format!("{boot}M")),
        Some(max) => {
            argv.push("-m", format!("{boot}M,maxmem={max}M"));
            argv.push(
                "-object",
                keyval_object(&devices::virtio_mem_backend(max - boot)),
            );
            let mut device = devices::virtio_mem_device();
            if let Some(requested) = layout.virtio_mem_requested_mib {
                device
                    .properties
                    .insert("requested-size".into(), (requested * devices::MIB).into());
            }
            argv.push("-device", keyval_device(&device));
        }
    }
}

fn push_boot(argv: &mut Argv, spec: &VmSpec) {
    if let Some(firmware) = &spec.firmware {
        argv.push("-bios", firmware.display().to_string());
    }
    if let Some(kernel) = &spec.kernel {
        argv.push("-kernel", kernel.display().to_string());
        if let Some(initrd) = &spec.initrd {
            argv.push("-initrd", initrd.display().to_string());
        }
        if let Some(cmdline) = &spec.cmdline {
            argv.push("-append", cmdline.clone());
        }
    }
}

fn push_devices(
    argv: &mut Argv,
    name: &str,
    spec: &VmSpec,
    layout: &Layout,
    block_devices: &BTreeSet<PathBuf>,
) {
    for n in 0..layout.root_ports.unwrap_or_else(|| root_port_count(spec)) {
        argv.push("-device", root_port(n));
    }
    let mut index = 0;
    for (id, disk) in &spec.disks {
        let backing = if block_devices.contains(&disk.path) {
            DiskBacking::BlockDevice
        } else {
            DiskBacking::File
        };
        argv.push(
            "-blockdev",
            keyval_blockdev(&devices::disk_file_node(id, disk, backing)),
        );
        argv.push(
            "-blockdev",
            keyval_blockdev(&devices::disk_format_node(id, disk)),
        );
        let boot = spec.boot_disk.as_deref() == Some(id.as_str());
        let device = devices::disk_device(id, disk, cold_plug_bus(spec, index), boot);
        argv.push("-device", keyval_device(&placed(device, layout)));
        index += 1;
    }
    for (id, nic) in &spec.nics {
        argv.push(
            "-netdev",
            keyval_netdev(&devices::nic_netdev(name, id, nic)),
        );
        let device = devices::nic_device(id, nic, cold_plug_bus(spec, index));
        argv.push("-device", keyval_device(&placed(device, layout)));
        index += 1;
    }
}

/// `device` where `layout` places it, if it does.
fn placed(mut device: DeviceProps, layout: &Layout) -> DeviceProps {
    if let Some(placement) = layout.placements.get(&device.id) {
        device.bus.clone_from(&placement.bus);
        if let Some(addr) = &placement.addr {
            device
                .properties
                .insert("addr".into(), addr.as_str().into());
        }
    }
    device
}

/// Root port `n`: function `n % 8` of slot `2 + n / 8`, its own chassis number.
fn root_port(n: u32) -> String {
    let (slot, function) = (FIRST_PORT_SLOT + n / PORTS_PER_SLOT, n % PORTS_PER_SLOT);
    let multifunction = if function == 0 {
        ",multifunction=on"
    } else {
        ""
    };
    format!(
        "pcie-root-port,id={},bus=pcie.0,addr={slot:#x}.{function:#x}{multifunction},chassis={},port={n}",
        ids::root_port(n),
        n + 1,
    )
}

/// The serial console: a socket the agent connects to (`plasmavmc console`), logged by QEMU
/// itself, appending, so the log holds every byte whether anyone is attached or not and can be
/// rotated under QEMU (see `console`).
fn push_console_and_monitor(argv: &mut Argv, spec: &VmSpec, vm_dir: &VmDir) {
    if spec.console_log {
        argv.push(
            "-chardev",
            format!(
                "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
                escape(&vm_dir.console_socket().display().to_string()),
                escape(&vm_dir.console_log().display().to_string())
            ),
        );
        argv.push("-serial", "chardev:console");
    } else {
        argv.push("-serial", "null");
    }
    let qmp = vm_dir.qmp_socket();
    argv.push(
        "-chardev",
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            escape(&qmp.display().to_string())
        ),
    );
    argv.push("-mon", "chardev=qmp,mode=control");
}

#[derive(Default)]
struct Argv(Vec<String>);

impl Argv {
    fn push(&mut self, option: &str, value: impl Into<String>) {
        self.0.push(option.to_owned());
        self.0.push(value.into());
    }

    fn flags(&mut self, flags: &[&str]) {
        self.0.extend(flags.iter().map(|f| (*f).to_owned()));
    }
}

/// `-device DRIVER,id=ID[,bus=BUS],props...`
fn keyval_device(device: &DeviceProps) -> String {
    let mut out = format!("{},id={}", device.driver, escape(&device.id));
    if let Some(bus) = &device.bus {
        out.push_str(&format!(",bus={}", escape(bus)));
    }
    append_keyval(&mut out, "", &device.properties);
    out
}

/// `-blockdev driver=..,node-name=..,...` from `blockdev-add` JSON.
fn keyval_blockdev(options: &Value) -> String {
    leading_keyval(options, "driver", |driver| format!("driver={driver}"))
}

/// `-netdev TYPE,id=..,...` from `netdev_add` JSON.
fn keyval_netdev(options: &Value) -> String {
    leading_keyval(options, "type", str::to_owned)
}

/// `-object TYPE,id=..,...` from `object-add` JSON.
fn keyval_object(options: &Value) -> String {
    leading_keyval(options, "qom-type", str::to_owned)
}

/// Renders a JSON object as QEMU `key=value` options: `lead` first (its value rendered by
/// `render_lead`), then `id` if any, then the rest in key order.
fn leading_keyval(options: &Value, lead: &str, render_lead: impl Fn(&str) -> String) -> String {
    let map = options.as_object().expect("QEMU options are a JSON object");
    let lead_value = map[lead].as_str().expect("the leading option is a string");
    let mut out = render_lead(lead_value);
    if let Some(Value::String(id)) = map.get("id") {
        out.push_str(&format!(",id={}", escape(id)));
    }
    let rest: Map<String, Value> = map
        .iter()
        .filter(|(key, _)| key.as_str() != lead && key.as_str() != "id")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    append_keyval(&mut out, "", &rest);
    out
}

/// Nested objects become dotted keys (`cache.direct=on`), as QEMU's keyval syntax has it.
fn append_keyval(out: &mut String, prefix: &str, map: &Map<String, Value>) {
    for (key, value) in map {
        let key = format!("{prefix}{key}");
        match value {
            Value::Object(inner) => append_keyval(out, &format!("{key}."), inner),
            Value::Bool(on) => out.push_str(&format!(",{key}={}", if *on { "on" } else { "off" })),
            Value::String(text) => out.push_str(&format!(",{key}={}", escape(text))),
            other => out.push_str(&format!(",{key}={other}")),
        }
    }
}

/// QEMU option values end at a comma; a literal comma is written twice.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

#[cfg(test)]
mod tests;
