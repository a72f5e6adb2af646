//! Declared disks and first-boot data through the real `plasmavmc` binary and a real guest (one
//! boot, shared by every check): images created with their size and format (an existing file is
//! never overwritten), a qcow2 overlay whose base stays untouched while the guest writes, a live
//! grow seen by the guest in the same QEMU, a shrink refused with nothing changed, removal that
//! keeps or (deleteOnRemove) deletes the image, a systemd credential read from fw_cfg by the
//! guest that appears in no host file, and a cloud-init seed the guest mounts.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::guest::{guest_cmdline, Console, READY};
use harness::*;
use serde_json::{json, Value};

const GUEST: Duration = Duration::from_secs(90);
const MIB: u64 = 1024 * 1024;
const SECRET: &str = "pv-secret-7f3a9c51e2b84d06";
const USER_DATA: &str = "#cloud-config\n# written by agent_disks\n";

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_owned()
}

/// `qemu-img info -U` of an image: (format, virtual size).
fn image_info(path: &Path) -> (String, u64) {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        info["format"].as_str().unwrap().to_owned(),
        info["virtual-size"].as_u64().unwrap(),
    )
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            out.extend(files_under(&path));
        } else if kind.is_file() {
            out.push(path);
        }
    }
    out
}

fn assert_secret_in_no_file(dirs: &[&Path]) {
    for dir in dirs {
        for file in files_under(dir) {
            let bytes = std::fs::read(&file).unwrap_or_default();
            assert!(
                !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                "the secret is in {}",
                file.display()
            );
        }
    }
}

fn console(host: &Host) -> Console {
    Console::new(host.run_dir.join("vms/web/console.log"))
}

fn reload(host: &Host) -> Cli {
    host.cli(&["reload", "--wait"])
}

#[test]
fn disks_credentials_and_seed_from_creation_to_removal() {
    let mut host = Host::new();
    let dir = host.dir.path().to_owned();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();

    // A base image with content, for an overlay the guest writes through.
    let base = qemu_harness::image(&images, "base.raw", "raw", 8);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .write_all(b"BASE-IMAGE-CONTENT")
        .unwrap();
    let base_sum = sha256(&std::fs::read(&base).unwrap());
    // An existing file that declares `create`: it must be left exactly as it is.
    let kept = images.join("kept.raw");
    let mut kept_bytes = b"keep me".to_vec();
    kept_bytes.resize(MIB as usize, 0);
    std::fs::write(&kept, &kept_bytes).unwrap();
    let secret_file = dir.join("secret-pw");
    std::fs::write(&secret_file, SECRET).unwrap();

    let data = images.join("data.qcow2");
    let overlay = images.join("overlay.qcow2");
    let disks = |data_mib: u64| {
        json!({
            "data": {"path": data, "format": "qcow2", "serial": "data", "sizeMiB": data_mib,
                     "create": {}, "deleteOnRemove": true},
            "overlay": {"path": overlay, "format": "qcow2", "serial": "overlay",
                        "create": {"from": base, "backing": true}},
            "kept": {"path": kept, "format": "raw", "serial": "kept", "sizeMiB": 1, "create": {}},
        })
    };
    let base_vm = host.vm(json!({
        "cmdline": format!("{} plasmavmc.write=overlay", guest_cmdline(false)),
        "cloudInit": {"userData": {"text": USER_DATA}},
    }));
    let vm = |disks: Value, credential_source: Value| {
        let mut vm = base_vm.clone();
        vm["disks"] = disks;
        vm["credentials"] = json!({"pw": credential_source, "hostname": {"text": "web"}});
        vm
    };
    let secret = json!({"file": secret_file});
    host.write_config(json!({ "web": vm(disks(64), secret.clone()) }));
    host.start_agent();
    let pid = host.wait_running("web");
    let console = console(&host);
    console
        .wait_for(READY, BOOT)
        .unwrap_or_else(|e| panic!("{e}"));

    // Created with the declared format and size; the existing file untouched; the base intact.
    assert_eq!(image_info(&data), ("qcow2".to_owned(), 64 * MIB));
    assert_eq!(image_info(&overlay), ("qcow2".to_owned(), 8 * MIB));
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        kept_bytes,
        "an existing file is never overwritten"
    );
    let state = console
        .wait_for_state(
            |s| {
                s.blocks
                    .values()
                    .filter(|v| *v == "data" || *v == "overlay" || *v == "kept")
                    .count()
                    == 3
            },
            GUEST,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let dev = |serial: &str| {
        state
            .blocks
            .iter()
            .find(|(_, s)| s.as_str() == serial)
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| panic!("no {serial} disk in {state:?}"))
    };
    let data_dev = dev("data");
    console
        .wait_for_block_size(&data_dev, 64 * MIB / 512, GUEST)
        .unwrap_or_else(|e| panic!("{e}"));

    // The guest wrote to the overlay: the write is in the overlay, the base is unchanged.
    console
        .wait_for(&format!("PLASMAVMC-GUEST-WROTE {}", dev("overlay")), GUEST)
        .unwrap_or_else(|e| panic!("{e}"));
    let flat = dir.join("overlay-flat.raw");
    let overlay_starts_with_marker = || {
        let converted = Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(&overlay)
            .arg(&flat)
            .status()
            .unwrap();
        converted.success()
            && std::fs::read(&flat)
                .unwrap()
                .starts_with(b"PLASMAVMC-WRITTEN-BY-GUEST")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !overlay_starts_with_marker() {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest's write is not in the overlay"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        sha256(&std::fs::read(&base).unwrap()),
        base_sum,
        "the base image was written"
    );

    // The credentials reached the guest through fw_cfg; the secret is in no host file.
    for (name, value) in [("pw", SECRET), ("hostname", "web")] {
        console
            .wait_for(
                &format!(
                    "PLASMAVMC-GUEST-CREDENTIAL {name} sha256={}",
                    sha256(value.as_bytes())
                ),
                GUEST,
            )
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_secret_in_no_file(&[&host.state_dir, &host.run_dir]);
    let desired = std::fs::read_to_string(&host.config).unwrap();
    assert!(!desired.contains(SECRET));

    // The cloud-init seed is a vfat disk the guest mounts and reads.
    console
        .wait_for(
            &format!(
                "files=meta-data,user-data user-data-sha256={}",
                sha256(USER_DATA.as_bytes())
            ),
            GUEST,
        )
        .unwrap_or_else(|e| panic!("{e}"));

    // Growing is live: same QEMU, the guest sees the new size, status shows it.
    host.write_config(json!({ "web": vm(disks(128), secret.clone()) }));
    let plan = host.cli(&["plan", "--config", path_str(&host.config)]);
    assert!(
        plan.stdout
            .contains("web: grow disk data 64 MiB -> 128 MiB"),
        "{}",
        plan.stdout
    );
    let grown = reload(&host).expect_code(0, "reload --wait");
    assert!(
        grown
            .stdout
            .contains("grow disk data 64 MiB -> 128 MiB: done"),
        "{}",
        grown.stdout
    );
    console
        .wait_for_block_size(&data_dev, 128 * MIB / 512, GUEST)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.wait_running("web"), pid, "a grow keeps the QEMU");
    assert_eq!(image_info(&data).1, 128 * MIB);
    assert_eq!(host.vm_status("web")["disks"]["data"]["sizeMiB"], 128);
    assert!(host.cli(&["status"]).stdout.contains("disk data: 128 MiB"));

    // A shrink is refused, loudly, and nothing changes.
    host.write_config(json!({ "web": vm(disks(32), secret.clone()) }));
    let plan = host.cli(&["plan", "--config", path_str(&host.config)]);
    assert_eq!(plan.code, 1, "plan refuses a shrink: {}", plan.stdout);
    assert!(plan.stdout.contains("REFUSED"), "{}", plan.stdout);
    let refused = reload(&host);
    assert_eq!(refused.code, 1, "{}", refused.stdout);
    assert!(
        refused
            .stdout
            .contains("web: REFUSED, never applied: disks.data.sizeMiB: 128 -> 32"),
        "{}",
        refused.stdout
    );
    assert_eq!(image_info(&data).1, 128 * MIB);
    assert_eq!(host.wait_running("web"), pid);
    console
        .wait_for_block_size(&data_dev, 128 * MIB / 512, Duration::ZERO)
        .unwrap_or_else(|e| panic!("the guest's disk changed after a refused shrink: {e}"));
    assert!(host
        .cli(&["status"])
        .stdout
        .contains("REFUSED disks.data.sizeMiB"));

    // New credentials wait for the next boot.
    host.write_config(json!({ "web": vm(disks(128), json!({"text": "not secret"})) }));
    reload(&host).expect_code(0, "reload --wait");
    let pending = host.vm_status("web")["pending"].to_string();
    assert!(pending.contains("credentials"), "{pending}");

    // Removal: data said deleteOnRemove (its image goes), kept did not (its image stays); a
    // disk hotplugged with `create` is made first.
    let extra = images.join("extra.qcow2");
    let mut remaining = disks(128);
    let remaining_map = remaining.as_object_mut().unwrap();
    remaining_map.remove("data");
    remaining_map.remove("kept");
    remaining_map.insert(
        "extra".into(),
        json!({"path": extra, "format": "qcow2", "serial": "extra", "sizeMiB": 16, "create": {}}),
    );
    host.write_config(json!({ "web": vm(remaining, secret) }));
    let plan = host.cli(&["plan", "--config", path_str(&host.config)]);
    assert!(
        plan.stdout
            .contains("remove disk data and DELETE its image"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("remove disk kept (its image is kept)"),
        "{}",
        plan.stdout
    );
    let removed = reload(&host).expect_code(0, "reload --wait");
    assert!(
        !data.exists(),
        "deleteOnRemove deletes the image: {}",
        removed.stdout
    );
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        kept_bytes,
        "a removed disk's image is kept"
    );
    assert_eq!(image_info(&extra), ("qcow2".to_owned(), 16 * MIB));
    console
        .wait_for_state(
            |s| {
                s.blocks.values().any(|v| v == "extra")
                    && !s.blocks.values().any(|v| v == "data" || v == "kept")
            },
            GUEST,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.wait_running("web"), pid);
    assert_secret_in_no_file(&[&host.state_dir, &host.run_dir]);
}
