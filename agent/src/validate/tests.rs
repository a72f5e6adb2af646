use serde_json::{json, Value};

use super::*;

/// A valid one-VM document to mutate.
fn base() -> Value {
    json!({
        "version": 1,
        "vms": {
            "web": {
                "vcpus": 2,
                "memoryMiB": 512,
                "kernel": "/boot/vmlinuz",
                "initrd": "/boot/initrd",
                "cmdline": "console=ttyS0",
                "disks": {"data": {"path": "/var/lib/vms/web.qcow2", "format": "qcow2"}},
                "nics": {"eth0": {"mac": "52:54:00:12:34:56", "bridge": "br0"}}
            }
        }
    })
}

fn web(doc: &mut Value) -> &mut Value {
    &mut doc["vms"]["web"]
}

fn problems(doc: &Value) -> Vec<String> {
    match parse_desired_state(&doc.to_string()) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.problems().iter().map(ToString::to_string).collect(),
    }
}

/// Asserts exactly one problem, at `path`, whose message contains `needle`.
fn assert_problem(doc: &Value, path: &str, needle: &str) {
    let found = problems(doc);
    assert_eq!(
        found.len(),
        1,
        "expected one problem at {path}, got {found:#?}"
    );
    assert!(
        found[0].starts_with(&format!("{path}: ")) && found[0].contains(needle),
        "expected `{path}: ...{needle}...`, got {found:#?}"
    );
}

#[test]
fn a_valid_document_parses_with_defaults() {
    let state = parse_desired_state(&base().to_string()).unwrap();
    let vm = &state.vms["web"];
    assert_eq!(vm.vcpus, 2);
    assert_eq!(vm.hotplug_slots, 8);
    assert!(vm.autostart);
}

#[test]
fn an_empty_document_is_valid() {
    assert!(problems(&json!({"version": 1})).is_empty());
}

#[test]
fn broken_json_says_where() {
    let errors = parse_desired_state("{\"version\": 1,\n  \"vms\": {").unwrap_err();
    let text = errors.to_string();
    assert!(
        text.starts_with("not valid JSON") && text.contains("line 2"),
        "{text}"
    );
}

#[test]
fn version_must_be_1() {
    let mut doc = base();
    doc["version"] = json!(2);
    assert_problem(&doc, "version", "unsupported version 2");
}

#[test]
fn unknown_keys_are_reported_with_their_path() {
    let mut doc = base();
    web(&mut doc)["vcpuz"] = json!(4);
    assert_problem(&doc, "vms.web.vcpuz", "unknown field `vcpuz`");
}

#[test]
fn wrong_types_are_reported_once_not_again_as_missing() {
    let mut doc = base();
    web(&mut doc)["memoryMiB"] = json!("lots");
    assert_problem(&doc, "vms.web.memoryMiB", "invalid type");
}

#[test]
fn missing_required_fields_are_reported_on_their_parent() {
    let mut doc = base();
    web(&mut doc).as_object_mut().unwrap().remove("vcpus");
    assert_problem(&doc, "vms.web", "missing field `vcpus`");
}

#[test]
fn unknown_enum_values_are_reported() {
    let mut doc = base();
    web(&mut doc)["machine"] = json!("q36");
    assert_problem(&doc, "vms.web.machine", "unknown variant `q36`");
}

#[test]
fn vm_names_must_be_safe_as_paths_and_ids() {
    for bad in ["Web", "1web", "web/x", "web.x", "", &"a".repeat(33)] {
        let mut doc = base();
        let vm = doc["vms"].as_object_mut().unwrap().remove("web").unwrap();
        doc["vms"][bad] = vm;
        let found = problems(&doc);
        assert_eq!(found.len(), 1, "{bad:?}: {found:#?}");
        assert!(
            found[0].contains("VM name must match"),
            "{bad:?}: {found:#?}"
        );
    }
    assert!(is_valid_vm_name("web-1"));
    assert!(is_valid_vm_name(&"a".repeat(32)));
}

#[test]
fn odd_keys_are_quoted_in_paths() {
    let mut doc = base();
    let vm = doc["vms"].as_object_mut().unwrap().remove("web").unwrap();
    doc["vms"]["my.vm"] = vm;
    assert_eq!(problems(&doc)[0].split(": ").next(), Some("vms[\"my.vm\"]"));
}

#[test]
fn disk_and_nic_ids_must_fit_qemu_node_names() {
    let mut doc = base();
    let disk = web(&mut doc)["disks"]
        .as_object_mut()
        .unwrap()
        .remove("data")
        .unwrap();
    web(&mut doc)["disks"]["Data_1"] = disk;
    assert_problem(&doc, "vms.web.disks.Data_1", "disk id must match");

    let mut doc = base();
    let nic = web(&mut doc)["nics"]
        .as_object_mut()
        .unwrap()
        .remove("eth0")
        .unwrap();
    web(&mut doc)["nics"][&"n".repeat(21)] = nic;
    assert_problem(
        &doc,
        &format!("vms.web.nics.{}", "n".repeat(21)),
        "NIC id must match",
    );
    assert!(is_valid_device_id(&"n".repeat(20)));
    assert!(crate::ids::disk_file_node(&"n".repeat(20)).len() <= 31);
}

#[test]
fn vcpus_bounds() {
    let mut doc = base();
    web(&mut doc)["vcpus"] = json!(0);
    assert_problem(&doc, "vms.web.vcpus", "between 1 and 255");

    let mut doc = base();
    web(&mut doc)["maxVcpus"] = json!(1);
    assert_problem(&doc, "vms.web.maxVcpus", "below vcpus");

    let mut doc = base();
    web(&mut doc)["maxVcpus"] = json!(256);
    assert_problem(&doc, "vms.web.maxVcpus", "at most 255");
}

#[test]
fn memory_bounds_and_virtio_mem_alignment() {
    let mut doc = base();
    web(&mut doc)["memoryMiB"] = json!(8);
    assert_problem(&doc, "vms.web.memoryMiB", "between 16 and");

    let mut doc = base();
    web(&mut doc)["maxMemoryMiB"] = json!(256);
    assert_problem(&doc, "vms.web.maxMemoryMiB", "below memoryMiB");

    let mut doc = base();
    web(&mut doc)["maxMemoryMiB"] = json!(1025);
    assert_problem(&doc, "vms.web.maxMemoryMiB", "multiple of 2 MiB");

    let mut doc = base();
    web(&mut doc)["memoryMiB"] = json!(513);
    assert!(
        problems(&doc).is_empty(),
        "odd memory is fine without virtio-mem"
    );
    web(&mut doc)["maxMemoryMiB"] = json!(1024);
    assert_problem(&doc, "vms.web.memoryMiB", "multiple of 2 MiB");
}

#[test]
fn boot_source_is_exactly_one_of_kernel_and_boot_disk() {
    let mut doc = base();
    for key in ["kernel", "initrd", "cmdline"] {
        web(&mut doc).as_object_mut().unwrap().remove(key);
    }
    assert_problem(&doc, "vms.web", "`kernel` or `bootDisk`");

    web(&mut doc)["bootDisk"] = json!("data");
    assert!(problems(&doc).is_empty());

    web(&mut doc)["bootDisk"] = json!("root");
    assert_problem(&doc, "vms.web.bootDisk", "names no disk");

    let mut doc = base();
    web(&mut doc)["bootDisk"] = json!("data");
    assert_problem(&doc, "vms.web.bootDisk", "not both");
}

#[test]
fn initrd_and_cmdline_only_with_kernel() {
    let mut doc = base();
    web(&mut doc).as_object_mut().unwrap().remove("kernel");
    web(&mut doc)["bootDisk"] = json!("data");
    let found = problems(&doc);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].starts_with("vms.web.initrd: only used with `kernel`"));
    assert!(found[1].starts_with("vms.web.cmdline: only used with `kernel`"));
}

#[test]
fn host_paths_must_be_absolute() {
    let mut doc = base();
    web(&mut doc)["kernel"] = json!("vmlinuz");
    assert_problem(&doc, "vms.web.kernel", "absolute");

    let mut doc = base();
    web(&mut doc)["firmware"] = json!("OVMF.fd");
    assert_problem(&doc, "vms.web.firmware", "absolute");

    let mut doc = base();
    web(&mut doc)["disks"]["data"]["path"] = json!("web.qcow2");
    assert_problem(&doc, "vms.web.disks.data.path", "absolute");

    let mut doc = base();
    web(&mut doc)["initrd"] = json!("/boot/in\nitrd");
    assert_problem(&doc, "vms.web.initrd", "control characters");
}

#[test]
fn macs_must_be_unicast_and_well_formed() {
    for (mac, needle) in [
        ("52:54:00:12:34", "not a MAC address"),
        ("52:54:00:12:34:5g", "not a MAC address"),
        ("52:54:00:12:34:+5", "not a MAC address"),
        ("00:00:00:00:00:00", "all-zero"),
        ("01:00:5e:00:00:01", "not a unicast MAC address"),
    ] {
        let mut doc = base();
        web(&mut doc)["nics"]["eth0"]["mac"] = json!(mac);
        assert_problem(&doc, "vms.web.nics.eth0.mac", needle);
    }
    let mut doc = base();
    web(&mut doc)["nics"]["eth0"]["mac"] = json!("52:54:00:AB:cd:EF");
    assert!(problems(&doc).is_empty());
}

#[test]
fn macs_are_unique_across_all_vms_ignoring_case() {
    let mut doc = base();
    let mut other = web(&mut doc).clone();
    other["nics"]["eth0"]["mac"] = json!("52:54:00:12:34:56".to_uppercase());
    other["disks"]["data"]["path"] = json!("/var/lib/vms/db.qcow2");
    doc["vms"]["db"] = other;
    assert_problem(
        &doc,
        "vms.web.nics.eth0.mac",
        "also used by vms.db.nics.eth0",
    );
}

#[test]
fn nic_is_on_exactly_one_of_bridge_and_tap() {
    let mut doc = base();
    web(&mut doc)["nics"]["eth0"]["tap"] = json!("tap0");
    assert_problem(&doc, "vms.web.nics.eth0.tap", "not both");

    let mut doc = base();
    web(&mut doc)["nics"]["eth0"]
        .as_object_mut()
        .unwrap()
        .remove("bridge");
    assert_problem(&doc, "vms.web.nics.eth0", "declare `bridge`");
}

#[test]
fn interface_names_are_checked() {
    for bad in ["a-very-long-bridge", "br 0", "br,0", "..", ""] {
        let mut doc = base();
        web(&mut doc)["nics"]["eth0"]["bridge"] = json!(bad);
        assert_problem(
            &doc,
            "vms.web.nics.eth0.bridge",
            "not a valid interface name",
        );
    }
    assert!(is_valid_ifname("vmbr0.100"));
}

#[test]
fn taps_are_unique_and_agent_names_reserved() {
    let mut doc = base();
    web(&mut doc)["nics"]["eth0"] = json!({"mac": "52:54:00:00:00:01", "tap": "tap0"});
    web(&mut doc)["nics"]["eth1"] = json!({"mac": "52:54:00:00:00:02", "tap": "tap0"});
    assert_problem(
        &doc,
        "vms.web.nics.eth1.tap",
        "also used by vms.web.nics.eth0",
    );

    let mut doc = base();
    let agent_made = crate::ids::agent_tap("web", "eth0");
    web(&mut doc)["nics"]["eth0"] = json!({"mac": "52:54:00:00:00:01", "tap": agent_made});
    assert_problem(&doc, "vms.web.nics.eth0.tap", "reserved");
}

#[test]
fn serials_fit_virtio_blk() {
    for bad in ["", "123456789012345678901", "a,b", "caf\u{e9}", "tab\there"] {
        let mut doc = base();
        web(&mut doc)["disks"]["data"]["serial"] = json!(bad);
        assert_problem(&doc, "vms.web.disks.data.serial", "printable ASCII");
    }
    let mut doc = base();
    web(&mut doc)["disks"]["data"]["serial"] = json!("DATA 0001");
    assert!(problems(&doc).is_empty());
}

#[test]
fn hotplug_slots_are_bounded() {
    let mut doc = base();
    web(&mut doc)["hotplugSlots"] = json!(33);
    assert_problem(&doc, "vms.web.hotplugSlots", "at most 32");
}

#[test]
fn pc_machines_have_fewer_device_slots() {
    let mut doc = base();
    web(&mut doc)["machine"] = json!("pc");
    for n in 0..MAX_DEVICES_PC {
        web(&mut doc)["disks"][format!("d{n}")] =
            json!({"path": format!("/img/{n}.raw"), "format": "raw"});
    }
    assert_problem(&doc, "vms.web", "at most 28 on this machine type");
}

#[test]
fn writable_images_are_attached_once_read_only_ones_shared() {
    let mut doc = base();
    web(&mut doc)["disks"]["copy"] = json!({"path": "/var/lib/vms/web.qcow2", "format": "qcow2"});
    assert_problem(
        &doc,
        "vms.web.disks.data.path",
        "image also used by vms.web.disks.copy",
    );

    let mut doc = base();
    web(&mut doc)["disks"]["data"]["readOnly"] = json!(true);
    web(&mut doc)["disks"]["copy"] =
        json!({"path": "/var/lib/vms/web.qcow2", "format": "qcow2", "readOnly": true});
    assert!(problems(&doc).is_empty());
}

#[test]
fn scopes_must_be_non_empty_and_slash_free() {
    let mut doc = base();
    web(&mut doc)["orgId"] = json!("a/b");
    assert_problem(&doc, "vms.web.orgId", "without '/'");
}

#[test]
fn ha_without_cluster_is_accepted() {
    let mut doc = base();
    web(&mut doc)["ha"] = json!({"enable": true});
    assert!(problems(&doc).is_empty());
}

#[test]
fn a_file_with_many_problems_reports_them_all() {
    let mut doc = base();
    doc["version"] = json!(3);
    web(&mut doc)["nics"]["eth0"]["mac"] = json!("01:00:00:00:00:01");
    web(&mut doc)["maxVcpus"] = json!(1);
    web(&mut doc)["disks"]["data"]["path"] = json!("relative.qcow2");
    let mut typo = web(&mut doc).clone();
    typo["vcpuz"] = json!(1);
    typo["accel"] = json!("xen");
    typo["memoryMiB"] = json!(-1);
    doc["vms"]["typo"] = typo;

    let found = problems(&doc);
    let expected = [
        "vms.typo.memoryMiB: invalid value",
        "vms.typo.accel: unknown variant `xen`",
        "vms.typo.vcpuz: unknown field `vcpuz`",
        "version: unsupported version 3",
        "vms.web.maxVcpus: 1 is below vcpus (2)",
        "vms.web.disks.data.path: must be an absolute path",
        "vms.web.nics.eth0.mac: not a unicast MAC address",
    ];
    for needle in expected {
        assert!(
            found.iter().any(|p| p.starts_with(needle)),
            "missing {needle:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
}

#[test]
fn display_is_one_problem_per_line() {
    let mut doc = base();
    doc["version"] = json!(3);
    web(&mut doc)["vcpus"] = json!(0);
    let errors = parse_desired_state(&doc.to_string()).unwrap_err();
    assert_eq!(errors.to_string().lines().count(), 2);
}

#[test]
fn load_names_the_unreadable_file() {
    let error = load_desired_state(Path::new("/nonexistent/desired.json")).unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("/nonexistent/desired.json") && text.contains("No such file"),
        "{text}"
    );
}

#[test]
fn load_names_the_invalid_file_and_its_problems() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("desired.json");
    std::fs::write(&path, r#"{"version": 1, "vms": {"Bad": {}}}"#).unwrap();
    let text = load_desired_state(&path).unwrap_err().to_string();
    assert!(
        text.contains(&*path.to_string_lossy()) && text.contains("vms.Bad"),
        "{text}"
    );
    std::fs::write(&path, base().to_string()).unwrap();
    assert!(load_desired_state(&path).is_ok());
}

#[test]
fn keys_given_twice_are_refused_with_their_path() {
    let text = base()
        .to_string()
        .replacen(r#""vcpus":2"#, r#""vcpus":2,"vcpus":64"#, 1);
    let errors = parse_desired_state(&text).unwrap_err();
    let found: Vec<String> = errors.problems().iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("vms.web.vcpus: key given twice"),
        "{found:#?}"
    );
}

#[test]
fn a_byte_order_mark_is_named_and_the_rest_still_checked() {
    let mut doc = base();
    doc["version"] = json!(3);
    let errors = parse_desired_state(&format!("\u{feff}{doc}")).unwrap_err();
    let text = errors.to_string();
    assert!(text.contains("UTF-8 BOM"), "{text}");
    assert!(text.contains("version: unsupported version 3"), "{text}");
}

#[test]
fn serials_are_unique_within_a_vm_not_across_vms() {
    let mut doc = base();
    web(&mut doc)["disks"]["data"]["serial"] = json!("S1");
    web(&mut doc)["disks"]["logs"] =
        json!({"path": "/var/lib/vms/logs.qcow2", "format": "qcow2", "serial": "S1"});
    assert_problem(
        &doc,
        "vms.web.disks.logs.serial",
        "also the serial of vms.web.disks.data",
    );

    let mut doc = base();
    web(&mut doc)["disks"]["data"]["serial"] = json!("S1");
    let mut db = web(&mut doc).clone();
    db["disks"]["data"]["path"] = json!("/var/lib/vms/db.qcow2");
    db["nics"]["eth0"]["mac"] = json!("52:54:00:12:34:57");
    doc["vms"]["db"] = db;
    assert!(problems(&doc).is_empty());
}

#[test]
fn cmdline_fits_the_kernel_buffer() {
    let mut doc = base();
    web(&mut doc)["cmdline"] = json!("x".repeat(MAX_CMDLINE_BYTES));
    assert!(problems(&doc).is_empty());
    web(&mut doc)["cmdline"] = json!("x".repeat(MAX_CMDLINE_BYTES + 1));
    assert_problem(&doc, "vms.web.cmdline", "COMMAND_LINE_SIZE");
}

/// Resolves the way a host with `/var/lib/vms -> /srv/vms` would.
struct SymlinkedDir;

impl ResolvePaths for SymlinkedDir {
    fn canonical(&self, path: &Path) -> Option<PathBuf> {
        let rest = path.strip_prefix("/var/lib/vms").ok()?;
        Some(Path::new("/srv/vms").join(rest))
    }
}

#[test]
fn one_image_through_two_paths_is_one_image() {
    let mut doc = base();
    web(&mut doc)["disks"]["alias"] = json!({"path": "/srv/vms/web.qcow2", "format": "qcow2"});
    let text = doc.to_string();
    assert!(parse_desired_state(&text).is_ok(), "as written they differ");
    let errors = parse_desired_state_on(&text, &SymlinkedDir).unwrap_err();
    let found: Vec<String> = errors.problems().iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("vms.web.disks.data.path: image also used by vms.web.disks.alias")
            && found[0].contains("are both /srv/vms/web.qcow2"),
        "{found:#?}"
    );
}

#[test]
fn the_host_resolves_symlinks_across_vms() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("shared.img");
    std::fs::write(&image, b"").unwrap();
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&image, &link).unwrap();
    let mut doc = base();
    web(&mut doc)["disks"]["data"]["path"] = json!(image);
    let mut db = web(&mut doc).clone();
    db["disks"]["data"]["path"] = json!(format!(
        "{}/../{}/link.img",
        dir.path().display(),
        dir.path().file_name().unwrap().to_string_lossy()
    ));
    db["nics"]["eth0"]["mac"] = json!("52:54:00:12:34:57");
    doc["vms"]["db"] = db;
    let path = dir.path().join("desired.json");
    std::fs::write(&path, doc.to_string()).unwrap();
    let text = load_desired_state(&path).unwrap_err().to_string();
    assert!(
        text.contains("vms.web.disks.data.path: image also used by vms.db.disks.data"),
        "{text}"
    );
}

#[test]
fn arrays_are_not_taken_for_objects() {
    let errors = parse_desired_state("[1, {}]").unwrap_err().to_string();
    assert!(
        errors.starts_with("the document must be a JSON object"),
        "{errors}"
    );
    let mut doc = base();
    doc["vms"]["db"] = json!([1, 64]);
    web(&mut doc)["disks"]["data"] = json!(["/var/lib/vms/web.qcow2", "qcow2"]);
    let found = problems(&doc);
    assert_eq!(
        found,
        [
            "vms.db: must be an object, not an array",
            "vms.web.disks.data: must be an object, not an array"
        ]
    );
}

#[test]
fn limits_are_checked_against_cgroup_ranges_and_the_guest_memory() {
    let mut doc = base();
    web(&mut doc)["limits"] =
        json!({"cpuWeight": 200, "cpuQuotaPercent": 150, "memoryMaxMiB": 4096});
    assert!(problems(&doc).is_empty(), "{:?}", problems(&doc));
    web(&mut doc)["limits"] = json!({"cpuWeight": 0});
    assert_problem(&doc, "vms.web.limits.cpuWeight", "between 1 and 10000");
    web(&mut doc)["limits"] = json!({"cpuQuotaPercent": 0});
    assert_problem(&doc, "vms.web.limits.cpuQuotaPercent", "between 1 and");
    let guest = web(&mut doc)["memoryMiB"].as_u64().unwrap();
    web(&mut doc)["limits"] = json!({"memoryMaxMiB": guest});
    assert_problem(&doc, "vms.web.limits.memoryMaxMiB", "no room for the guest");
    web(&mut doc)["limits"] = json!({"memoryMax": 1});
    assert_problem(&doc, "vms.web.limits.memoryMax", "unknown field");
}

#[test]
fn disk_creation_and_sizes_are_checked() {
    let mut doc = base();
    web(&mut doc)["disks"]["data"]["create"] = json!({});
    assert_problem(&doc, "vms.web.disks.data.sizeMiB", "a blank image");
    web(&mut doc)["disks"]["data"]["sizeMiB"] = json!(0);
    assert_problem(&doc, "vms.web.disks.data.sizeMiB", "between 1 and");
    web(&mut doc)["disks"]["data"]["sizeMiB"] = json!(1024);
    assert!(problems(&doc).is_empty(), "{:?}", problems(&doc));

    web(&mut doc)["disks"]["data"]["create"] = json!({"backing": true});
    assert_problem(&doc, "vms.web.disks.data.create.backing", "set `from`");
    web(&mut doc)["disks"]["data"]["create"] = json!({"from": "base.raw", "backing": true});
    assert_problem(&doc, "vms.web.disks.data.create.from", "absolute");
    web(&mut doc)["disks"]["data"]["format"] = json!("raw");
    web(&mut doc)["disks"]["data"]["create"] = json!({"from": "/img/base.raw", "backing": true});
    assert_problem(&doc, "vms.web.disks.data.create.backing", "qcow2");
    web(&mut doc)["disks"]["data"]["create"] = json!({"from": "/img/base.raw"});
    assert!(problems(&doc).is_empty(), "{:?}", problems(&doc));

    web(&mut doc)["disks"]["data"]["readOnly"] = json!(true);
    assert_problem(&doc, "vms.web.disks.data.sizeMiB", "never resized");
    web(&mut doc)["disks"]["data"]["sizeMiB"] = json!(null);
    web(&mut doc)["disks"]["data"]["deleteOnRemove"] = json!(true);
    assert_problem(&doc, "vms.web.disks.data.deleteOnRemove", "never deleted");
}

#[test]
fn credentials_have_fw_cfg_names_and_one_source_outside_the_store() {
    let mut doc = base();
    web(&mut doc)["credentials"] = json!({
        "passwd.hashed-password.root": {"file": "/run/agenix/root"},
        "system.hostname": {"text": "web"}
    });
    assert!(problems(&doc).is_empty(), "{:?}", problems(&doc));
    web(&mut doc)["credentials"] = json!({"a-name-that-is-far-too-long-for-fw-cfg": {"text": "x"}});
    assert_problem(
        &doc,
        "vms.web.credentials.a-name-that-is-far-too-long-for-fw-cfg",
        "1 to 28",
    );
    web(&mut doc)["credentials"] = json!({"pw": {"text": "x", "file": "/run/pw"}});
    assert_problem(&doc, "vms.web.credentials.pw", "exactly one");
    web(&mut doc)["credentials"] = json!({"pw": {"file": "/nix/store/abc-pw"}});
    assert_problem(&doc, "vms.web.credentials.pw.file", "Nix store");
}

#[test]
fn cloud_init_parts_have_one_source_each() {
    let mut doc = base();
    web(&mut doc)["cloudInit"] = json!({"userData": {"text": "#cloud-config\n"}, "networkConfig": {"file": "/etc/net.yaml"}});
    assert!(problems(&doc).is_empty(), "{:?}", problems(&doc));
    web(&mut doc)["cloudInit"] = json!({"metaData": {}});
    assert_problem(&doc, "vms.web.cloudInit.metaData", "exactly one");
    web(&mut doc)["cloudInit"] = json!({"vendorData": {"text": ""}});
    assert_problem(&doc, "vms.web.cloudInit.vendorData", "unknown field");
}

#[test]
fn preferred_hosts_need_ha_and_are_host_ids_each_once() {
    let mut doc = base();
    web(&mut doc)["ha"] = json!({"enable": true, "preferredHosts": ["hv-01", "hv-02"]});
    assert_eq!(problems(&doc), Vec::<String>::new());
    let parsed = parse_desired_state(&doc.to_string()).unwrap();
    assert_eq!(parsed.vms["web"].ha.preferred_hosts, ["hv-01", "hv-02"]);

    web(&mut doc)["ha"]["enable"] = json!(false);
    assert_problem(&doc, "vms.web.ha.preferredHosts", "needs ha.enable");

    web(&mut doc)["ha"] = json!({"enable": true, "preferredHosts": ["hv-01", "hv-01"]});
    assert_problem(&doc, "vms.web.ha.preferredHosts.1", "hv-01 is listed twice");
    web(&mut doc)["ha"] = json!({"enable": true, "preferredHosts": ["hv/01"]});
    assert_problem(&doc, "vms.web.ha.preferredHosts.0", "is no host id");
}
