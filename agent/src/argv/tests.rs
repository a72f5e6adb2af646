use serde_json::json;

use super::*;
use crate::paths::RunDir;
use crate::spec::VmSpec;

fn spec(extra: serde_json::Value) -> VmSpec {
    let mut doc = json!({"vcpus": 2, "memoryMiB": 512, "kernel": "/k/vmlinuz", "accel": "tcg"});
    doc.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(doc).unwrap()
}

fn argv(spec: &VmSpec) -> Vec<String> {
    qemu_argv(
        "web",
        spec,
        &RunDir::new("/run/pv").vm("web"),
        &BTreeSet::new(),
        &PassedFds::default(),
    )
}

/// The values given to `option`, in order.
fn values<'a>(argv: &'a [String], option: &str) -> Vec<&'a str> {
    argv.windows(2)
        .filter(|pair| pair[0] == option)
        .map(|pair| pair[1].as_str())
        .collect()
}

fn value<'a>(argv: &'a [String], option: &str) -> &'a str {
    let found = values(argv, option);
    assert_eq!(found.len(), 1, "{option}: {found:?}");
    found[0]
}

#[test]
fn identity_machine_and_isolation_flags() {
    let a = argv(&spec(json!({"hotplugSlots": 0})));
    assert_eq!(value(&a, "-name"), "guest=web,debug-threads=on");
    assert_eq!(value(&a, "-machine"), "q35,accel=tcg");
    assert_eq!(value(&a, "-cpu"), "max");
    for flag in ["-nodefaults", "-no-user-config"] {
        assert!(a.iter().any(|x| x == flag), "{flag}");
    }
    assert_eq!(value(&a, "-display"), "none");
    assert_eq!(
        value(&a, "-sandbox"),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    );
    for absent in ["-daemonize", "-pidfile", "-nographic"] {
        assert!(!a.iter().any(|x| x == absent), "{absent}");
    }

    let kvm_pc = argv(&spec(json!({"accel": "kvm", "machine": "pc"})));
    assert_eq!(value(&kvm_pc, "-machine"), "pc,accel=kvm");
    assert_eq!(value(&kvm_pc, "-cpu"), "host");
}

#[test]
fn smp_has_an_explicit_topology_with_room_for_hotplug() {
    assert_eq!(
        value(&argv(&spec(json!({}))), "-smp"),
        "2,maxcpus=2,sockets=1,cores=2,threads=1"
    );
    assert_eq!(
        value(&argv(&spec(json!({"maxVcpus": 8}))), "-smp"),
        "2,maxcpus=8,sockets=1,cores=8,threads=1"
    );
}

#[test]
fn fixed_memory_has_no_virtio_mem() {
    for extra in [json!({}), json!({"maxMemoryMiB": 512})] {
        let a = argv(&spec(extra));
        assert_eq!(value(&a, "-m"), "512M");
        assert!(values(&a, "-object").is_empty());
        assert!(!values(&a, "-device")
            .iter()
            .any(|d| d.starts_with("virtio-mem")));
    }
}

#[test]
fn live_memory_adds_an_empty_virtio_mem_device_up_to_the_ceiling() {
    let a = argv(&spec(json!({"maxMemoryMiB": 2048})));
    assert_eq!(value(&a, "-m"), "512M,maxmem=2048M");
    assert_eq!(
        value(&a, "-object"),
        "memory-backend-ram,id=mem0-ram,size=1610612736"
    );
    assert!(values(&a, "-device").contains(&"virtio-mem-pci,id=mem0,memdev=mem0-ram"));
}

#[test]
fn direct_kernel_boot() {
    let a = argv(&spec(
        json!({"initrd": "/k/initrd", "cmdline": "console=ttyS0 quiet"}),
    ));
    assert_eq!(value(&a, "-kernel"), "/k/vmlinuz");
    assert_eq!(value(&a, "-initrd"), "/k/initrd");
    assert_eq!(value(&a, "-append"), "console=ttyS0 quiet");
    assert!(values(&a, "-bios").is_empty());
}

#[test]
fn disk_boot_with_firmware_marks_the_boot_disk() {
    let s: VmSpec = serde_json::from_value(json!({
        "vcpus": 1, "memoryMiB": 256, "bootDisk": "root", "firmware": "/fw/OVMF.fd", "hotplugSlots": 0,
        "disks": {
            "root": {"path": "/img/root.qcow2", "format": "qcow2"},
            "data": {"path": "/img/data.raw", "format": "raw", "readOnly": true, "cache": "none", "serial": "D1"}
        }
    }))
    .unwrap();
    let a = argv(&s);
    assert!(values(&a, "-kernel").is_empty());
    assert_eq!(value(&a, "-bios"), "/fw/OVMF.fd");
    assert_eq!(
        values(&a, "-blockdev"),
        [
            "driver=file,cache.direct=on,cache.no-flush=off,filename=/img/data.raw,node-name=disk-data-file,read-only=on",
            "driver=raw,cache.direct=on,cache.no-flush=off,file=disk-data-file,node-name=disk-data-fmt,read-only=on",
            "driver=file,cache.direct=off,cache.no-flush=off,filename=/img/root.qcow2,node-name=disk-root-file,read-only=off",
            "driver=qcow2,cache.direct=off,cache.no-flush=off,file=disk-root-file,node-name=disk-root-fmt,read-only=off",
        ]
    );
    let devices = values(&a, "-device");
    assert!(devices.contains(
        &"virtio-blk-pci,id=disk-data,bus=port0,drive=disk-data-fmt,serial=D1,write-cache=on"
    ));
    assert!(devices.contains(
        &"virtio-blk-pci,id=disk-root,bus=port1,bootindex=1,drive=disk-root-fmt,write-cache=on"
    ));
}

#[test]
fn block_devices_are_opened_with_host_device_image_files_with_file() {
    let s = spec(json!({"disks": {
        "lv": {"path": "/dev/vg0/web-data", "format": "raw"},
        "img": {"path": "/img/a.qcow2", "format": "qcow2"}
    }}));
    let block_devices = BTreeSet::from([PathBuf::from("/dev/vg0/web-data")]);
    let a = qemu_argv(
        "web",
        &s,
        &RunDir::new("/run/pv").vm("web"),
        &block_devices,
        &PassedFds::default(),
    );
    let blockdevs = values(&a, "-blockdev");
    assert!(blockdevs[0].starts_with("driver=file,") && blockdevs[0].contains("/img/a.qcow2"));
    assert!(blockdevs[2].starts_with("driver=host_device,"));
    assert!(blockdevs[2].contains("filename=/dev/vg0/web-data,"));
}

#[test]
fn nics_use_tap_netdevs_without_scripts() {
    let a = argv(&spec(json!({"hotplugSlots": 0, "nics": {
        "eth0": {"mac": "52:54:00:00:00:01", "bridge": "br0"},
        "eth1": {"mac": "52:54:00:00:00:02", "tap": "tap9"}
    }})));
    let tap = crate::ids::agent_tap("web", "eth0");
    assert_eq!(
        values(&a, "-netdev"),
        [
            format!("tap,id=net-eth0,downscript=no,ifname={tap},script=no"),
            "tap,id=net-eth1,downscript=no,ifname=tap9,script=no".to_owned(),
        ]
    );
    let devices = values(&a, "-device");
    assert!(devices
        .contains(&"virtio-net-pci,id=nic-eth0,bus=port0,mac=52:54:00:00:00:01,netdev=net-eth0"));
    assert!(devices
        .contains(&"virtio-net-pci,id=nic-eth1,bus=port1,mac=52:54:00:00:00:02,netdev=net-eth1"));
}

#[test]
fn q35_gets_a_root_port_per_device_plus_free_ones_packed_eight_per_slot() {
    let s = spec(json!({"hotplugSlots": 8,
        "disks": {"a": {"path": "/img/a.raw", "format": "raw"}},
        "nics": {"eth0": {"mac": "52:54:00:00:00:01", "tap": "tap0"}}}));
    assert_eq!(root_port_count(&s), 10);
    let a = argv(&s);
    let ports: Vec<&str> = values(&a, "-device")
        .into_iter()
        .filter(|d| d.starts_with("pcie-root-port"))
        .collect();
    assert_eq!(ports.len(), 10);
    assert_eq!(
        ports[0],
        "pcie-root-port,id=port0,bus=pcie.0,addr=0x2.0x0,multifunction=on,chassis=1,port=0"
    );
    assert_eq!(
        ports[7],
        "pcie-root-port,id=port7,bus=pcie.0,addr=0x2.0x7,chassis=8,port=7"
    );
    assert_eq!(
        ports[8],
        "pcie-root-port,id=port8,bus=pcie.0,addr=0x3.0x0,multifunction=on,chassis=9,port=8"
    );
}

#[test]
fn pc_has_no_root_ports_and_lets_qemu_place_devices() {
    let s = spec(json!({"machine": "pc", "hotplugSlots": 8,
        "disks": {"a": {"path": "/img/a.raw", "format": "raw"}}}));
    assert_eq!(root_port_count(&s), 0);
    let a = argv(&s);
    assert_eq!(
        values(&a, "-device"),
        ["virtio-blk-pci,id=disk-a,drive=disk-a-fmt,write-cache=on"]
    );
}

#[test]
fn console_socket_and_log_and_qmp_live_in_the_vm_dir() {
    let a = argv(&spec(json!({})));
    assert_eq!(
        values(&a, "-chardev"),
        [
            "socket,id=console,path=/run/pv/vms/web/console.sock,server=on,wait=off,\
             logfile=/run/pv/vms/web/console.log,logappend=on",
            "socket,id=qmp,path=/run/pv/vms/web/qmp.sock,server=on,wait=off",
        ]
    );
    assert_eq!(value(&a, "-serial"), "chardev:console");
    assert_eq!(value(&a, "-mon"), "chardev=qmp,mode=control");

    let quiet = argv(&spec(json!({"consoleLog": false})));
    assert_eq!(value(&quiet, "-serial"), "null");
    assert_eq!(values(&quiet, "-chardev").len(), 1);
}

#[test]
fn commas_in_values_are_doubled() {
    let s = spec(json!({"disks": {"a": {"path": "/img/a,b.raw", "format": "raw"}}}));
    let a = qemu_argv(
        "web",
        &s,
        &RunDir::new("/run/p,v").vm("web"),
        &BTreeSet::new(),
        &PassedFds::default(),
    );
    assert!(values(&a, "-blockdev")[0].contains("filename=/img/a,,b.raw,"));
    assert!(values(&a, "-chardev")[0].contains("path=/run/p,,v/vms/web/console.sock,"));
    assert!(values(&a, "-chardev")[0].contains("logfile=/run/p,,v/vms/web/console.log,"));
}

#[test]
fn credentials_and_the_seed_are_read_from_passed_descriptors_only() {
    let s = spec(json!({
        "credentials": {"root-pw": {"file": "/run/agenix/root-pw"}},
        "cloudInit": {"userData": {"text": "#cloud-config"}}
    }));
    let passed = PassedFds {
        credentials: [("root-pw".to_owned(), 17)].into(),
        seed: Some(18),
    };
    let a = qemu_argv(
        "web",
        &s,
        &RunDir::new("/run/pv").vm("web"),
        &BTreeSet::new(),
        &passed,
    );
    assert_eq!(
        value(&a, "-fw_cfg"),
        "name=opt/io.systemd.credentials/root-pw,file=/dev/fd/17"
    );
    assert_eq!(
        values(&a, "-blockdev"),
        [
            "driver=file,filename=/dev/fd/18,node-name=seed-cidata-file,read-only=on",
            "driver=raw,file=seed-cidata-file,node-name=seed-cidata-fmt,read-only=on",
        ]
    );
    assert_eq!(
        *values(&a, "-device").last().unwrap(),
        "virtio-blk-pci,id=seed-cidata,drive=seed-cidata-fmt,serial=cidata"
    );
    let joined = a.join(" ");
    assert!(
        !joined.contains("agenix") && !joined.contains("cloud-config"),
        "{joined}"
    );
}

#[test]
fn a_layout_places_devices_keeps_the_boot_root_ports_and_the_virtio_mem_request() {
    use crate::migration::{Layout, Placement};
    let s = spec(json!({
        "maxMemoryMiB": 1024, "hotplugSlots": 2,
        "disks": {"data": {"path": "/img/d.raw", "format": "raw"}},
    }));
    let layout = Layout {
        root_ports: Some(5),
        placements: [(
            "disk-data".to_owned(),
            Placement {
                bus: Some("port4".into()),
                addr: Some("0.0".into()),
            },
        )]
        .into(),
        virtio_mem_requested_mib: Some(128),
        hotplugged_cpus: vec![],
    };
    let a = qemu_argv_laid_out(
        "web",
        &s,
        &layout,
        &RunDir::new("/run/pv").vm("web"),
        &BTreeSet::new(),
        &PassedFds::default(),
    );
    let devices = values(&a, "-device");
    assert_eq!(
        devices
            .iter()
            .filter(|d| d.starts_with("pcie-root-port"))
            .count(),
        5
    );
    assert!(
        devices.contains(
            &"virtio-blk-pci,id=disk-data,bus=port4,addr=0.0,drive=disk-data-fmt,write-cache=on"
        ),
        "{devices:?}"
    );
    assert!(
        devices.contains(&"virtio-mem-pci,id=mem0,memdev=mem0-ram,requested-size=134217728"),
        "{devices:?}"
    );
    assert_eq!(
        qemu_argv_laid_out(
            "web",
            &s,
            &Layout::default(),
            &RunDir::new("/run/pv").vm("web"),
            &BTreeSet::new(),
            &PassedFds::default()
        ),
        argv(&s),
        "the default layout is a boot's"
    );
}
