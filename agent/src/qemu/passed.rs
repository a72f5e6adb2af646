//! What QEMU reads at launch from descriptors the agent hands it: systemd credentials and the
//! cloud-init seed image.
//!
//! Each is a sealed memfd: the agent reads the declared `file`s (secrets from agenix, sops-nix,
//! ...) when the VM starts and puts the bytes in anonymous memory, QEMU inherits the descriptor
//! and reads `/dev/fd/N` once. The value never lands in a host file (not the run dir, not the
//! state dir), never in the Nix store or the desired state, and never in QEMU's argv, which any
//! local user can read in `/proc/PID/cmdline`. After the launch only QEMU holds it.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Context, Result};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use crate::argv::PassedFds;
use crate::seed::{self, SeedContents};
use crate::spec::{Content, VmSpec};

/// The open descriptors (closed when dropped, after the launch) and where argv finds them.
pub struct Passed {
    pub fds: PassedFds,
    _owned: Vec<OwnedFd>,
}

impl Passed {
    /// Every descriptor QEMU must inherit.
    pub fn raw_fds(&self) -> Vec<i32> {
        self._owned.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

/// Reads `spec`'s credentials and cloud-init data and puts each into a memfd.
pub fn open(vm: &str, spec: &VmSpec) -> Result<Passed> {
    let mut passed = Passed {
        fds: PassedFds::default(),
        _owned: Vec::new(),
    };
    for (name, content) in &spec.credentials {
        let bytes = read(content).with_context(|| format!("VM {vm}: credentials.{name}"))?;
        let fd = sealed_memfd(&format!("credential-{name}"), &bytes)?;
        passed.fds.credentials.insert(name.clone(), fd.as_raw_fd());
        passed._owned.push(fd);
    }
    if let Some(cloud_init) = &spec.cloud_init {
        let read_part = |part: &Option<Content>, key: &str| {
            part.as_ref()
                .map(read)
                .transpose()
                .with_context(|| format!("VM {vm}: cloudInit.{key}"))
        };
        let contents = SeedContents {
            user_data: read_part(&cloud_init.user_data, "userData")?,
            meta_data: read_part(&cloud_init.meta_data, "metaData")?,
            network_config: read_part(&cloud_init.network_config, "networkConfig")?,
        };
        let image = seed::fat_image(&seed::seed_files(vm, &contents))
            .with_context(|| format!("VM {vm}: building the cloud-init seed"))?;
        let fd = sealed_memfd("cidata", &image)?;
        passed.fds.seed = Some(fd.as_raw_fd());
        passed._owned.push(fd);
    }
    Ok(passed)
}

fn read(content: &Content) -> Result<Vec<u8>> {
    match (&content.text, &content.file) {
        (Some(text), _) => Ok(text.as_bytes().to_vec()),
        (None, Some(file)) => {
            std::fs::read(file).with_context(|| format!("reading {}", file.display()))
        }
        (None, None) => Ok(Vec::new()),
    }
}

/// An anonymous file holding `bytes`, sealed so nobody can change it afterwards.
fn sealed_memfd(name: &str, bytes: &[u8]) -> Result<OwnedFd> {
    let name = CString::new(format!("plasmavmc-{name}")).expect("names have no NUL");
    let fd = memfd_create(
        &name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .context("memfd_create")?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes).context("filling a memfd")?;
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_SEAL;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).context("sealing a memfd")?;
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credentials_and_seed_are_sealed_memfds_readable_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"hunter2").unwrap();
        let spec: VmSpec = serde_json::from_value(json!({
            "vcpus": 1, "memoryMiB": 64, "kernel": "/k",
            "credentials": {"pw": {"file": secret}, "hostname": {"text": "web"}},
            "cloudInit": {"userData": {"text": "#cloud-config\n"}}
        }))
        .unwrap();
        let passed = open("web", &spec).unwrap();
        assert_eq!(passed.raw_fds().len(), 3);
        let read_fd = |fd: i32| std::fs::read(format!("/dev/fd/{fd}")).unwrap();
        assert_eq!(read_fd(passed.fds.credentials["pw"]), b"hunter2");
        assert_eq!(read_fd(passed.fds.credentials["hostname"]), b"web");
        let seed = read_fd(passed.fds.seed.unwrap());
        assert_eq!(seed.len() % (1024 * 1024), 0);
        let again = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/dev/fd/{}", passed.fds.credentials["pw"]))
            .and_then(|mut f| f.write_all(b"x"));
        assert!(again.is_err(), "a sealed credential cannot be changed");
    }

    #[test]
    fn an_unreadable_secret_names_the_credential() {
        let spec: VmSpec = serde_json::from_value(json!({
            "vcpus": 1, "memoryMiB": 64, "kernel": "/k",
            "credentials": {"pw": {"file": "/nonexistent/secret"}}
        }))
        .unwrap();
        let error = format!("{:#}", open("web", &spec).err().unwrap());
        assert!(
            error.contains("VM web: credentials.pw: reading /nonexistent/secret"),
            "{error}"
        );
    }
}
