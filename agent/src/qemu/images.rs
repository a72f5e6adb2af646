//! Disk images on the host, made ready before QEMU opens them: created when missing (with
//! `create`), grown to the declared size, deleted on removal with `deleteOnRemove`. The decisions
//! are `disk_image`'s; this runs `qemu-img`.
//!
//! `qemu-img` is the one next to the QEMU binary (same package), else the one on `PATH`.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::confine;
use crate::disk_image::{self, Existing, ImageInfo};
use crate::runas::RunAs;
use crate::spec::{DiskFormat, DiskSpec, VmSpec};

/// The `qemu-img` that belongs to the QEMU binary `qemu`.
pub fn qemu_img(qemu: &Path) -> PathBuf {
    qemu.parent()
        .map(|dir| dir.join("qemu-img"))
        .filter(|sibling| sibling.is_file())
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}

/// Makes every disk of `spec` ready to be opened (before a start).
pub async fn prepare_all(qemu_img: &Path, spec: &VmSpec, run_as: Option<&RunAs>) -> Result<()> {
    for (id, disk) in &spec.disks {
        prepare(qemu_img, id, disk, run_as).await?;
    }
    Ok(())
}

/// Makes disk `id`'s image ready to be opened: creates it if missing (never over an existing
/// file; QEMU's, running as `run_as`, from the start), grows it to `sizeMiB`, refuses a shrink.
pub async fn prepare(
    qemu_img: &Path,
    id: &str,
    disk: &DiskSpec,
    run_as: Option<&RunAs>,
) -> Result<()> {
    if let Some(image) = info(qemu_img, &disk.path, Some(disk.format)).await? {
        if let Existing::Grow(size) =
            disk_image::check_existing(id, disk, image.virtual_size).map_err(anyhow::Error::msg)?
        {
            tracing::info!(disk = id, path = %disk.path.display(), size, "growing the image to its declared size");
            run(
                qemu_img,
                &disk_image::resize_command(disk.format, &disk.path, size),
            )
            .await?;
        }
        return Ok(());
    }
    let base = match disk.create.as_ref().and_then(|c| c.from.as_ref()) {
        Some(from) => Some(info(qemu_img, from, None).await?.with_context(|| {
            format!(
                "disks.{id}: its base image {} does not exist",
                from.display()
            )
        })?),
        None => None,
    };
    let tmp = temporary_name(&disk.path);
    remove_if_present(&tmp)?;
    let commands =
        disk_image::create_commands(id, disk, base.as_ref(), &tmp).map_err(anyhow::Error::msg)?;
    let made = async {
        for command in &commands {
            run(qemu_img, command).await?;
        }
        // link(2) fails if the path exists: whatever appeared there meanwhile is never replaced.
        std::fs::hard_link(&tmp, &disk.path).with_context(|| {
            format!(
                "disks.{id}: putting the new image at {}",
                disk.path.display()
            )
        })
    }
    .await;
    let _ = std::fs::remove_file(&tmp);
    made?;
    confine::grant_disk(&disk.path, disk.read_only, run_as)?;
    tracing::info!(disk = id, path = %disk.path.display(), "created the disk image");
    Ok(())
}

/// Deletes the image of a disk removed with `deleteOnRemove`.
pub fn delete(path: &Path) -> Result<()> {
    remove_if_present(path)?;
    tracing::info!(path = %path.display(), "deleted the image of a removed disk (deleteOnRemove)");
    Ok(())
}

/// What `qemu-img info` says about `path`; None if there is no such file. With `format`, the
/// image is read as that format: a guest's raw disk is never probed (its content could pose as
/// a qcow2 header naming a host file as backing). Base images (`create.from`) are the operator's
/// and are probed.
pub async fn info(
    qemu_img: &Path,
    path: &Path,
    format: Option<DiskFormat>,
) -> Result<Option<ImageInfo>> {
    #[derive(Deserialize)]
    struct Info {
        format: String,
        #[serde(rename = "virtual-size")]
        virtual_size: u64,
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        Ok(_) => {}
    }
    // -U: the image may be open in a running QEMU, which holds its lock.
    let mut args: Vec<String> = vec!["info".into(), "-U".into(), "--output=json".into()];
    if let Some(format) = format {
        args.extend(["-f".into(), disk_image::format_name(format).into()]);
    }
    args.push(path.display().to_string());
    let output = run(qemu_img, &args).await?;
    let info: Info = serde_json::from_slice(&output)
        .with_context(|| format!("qemu-img info {}: unexpected output", path.display()))?;
    let format = match info.format.as_str() {
        "qcow2" => DiskFormat::Qcow2,
        "raw" => DiskFormat::Raw,
        other => bail!(
            "{}: a {other} image; plasmavmc handles qcow2 and raw",
            path.display()
        ),
    };
    Ok(Some(ImageInfo {
        format,
        virtual_size: info.virtual_size,
    }))
}

/// Runs `qemu-img args`; its stdout, or an error with its stderr.
async fn run(qemu_img: &Path, args: &[String]) -> Result<Vec<u8>> {
    let output = tokio::process::Command::new(qemu_img)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", qemu_img.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            qemu_img.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// `<dir>/.<name>.plasmavmc-new`: beside the image (same filesystem, for the link), hidden.
fn temporary_name(path: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".plasmavmc-new");
    path.with_file_name(name)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::MIB;
    use serde_json::json;

    fn disk(
        path: &Path,
        format: &str,
        size_mib: Option<u64>,
        create: serde_json::Value,
    ) -> DiskSpec {
        serde_json::from_value(json!({
            "path": path, "format": format, "sizeMiB": size_mib, "create": create,
        }))
        .unwrap()
    }

    async fn size_of(qemu_img: &Path, path: &Path) -> u64 {
        info(qemu_img, path, None)
            .await
            .unwrap()
            .unwrap()
            .virtual_size
    }

    #[tokio::test]
    async fn creates_grows_and_never_overwrites_or_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let qemu_img = qemu_img(Path::new("/usr/bin/qemu-system-x86_64"));
        let path = dir.path().join("data.qcow2");
        let mut d = disk(&path, "qcow2", Some(64), json!({}));
        prepare(&qemu_img, "data", &d, None).await.unwrap();
        let made = info(&qemu_img, &path, None).await.unwrap().unwrap();
        assert_eq!(made.virtual_size, 64 * MIB);
        assert_eq!(made.format, DiskFormat::Qcow2);
        assert!(!temporary_name(&path).exists());

        d.size_mib = Some(128);
        prepare(&qemu_img, "data", &d, None).await.unwrap();
        assert_eq!(size_of(&qemu_img, &path).await, 128 * MIB);
        d.size_mib = Some(32);
        let error = prepare(&qemu_img, "data", &d, None).await.unwrap_err();
        assert!(
            format!("{error}").contains("shrinking destroys data"),
            "{error}"
        );
        assert_eq!(size_of(&qemu_img, &path).await, 128 * MIB);

        let raw = dir.path().join("notes.raw");
        std::fs::write(&raw, b"keep me").unwrap();
        let existing = disk(&raw, "raw", None, json!({}));
        prepare(&qemu_img, "notes", &existing, None).await.unwrap();
        assert_eq!(std::fs::read(&raw).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn a_missing_image_without_create_or_base_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let qemu_img = qemu_img(Path::new("/usr/bin/qemu-system-x86_64"));
        let path = dir.path().join("gone.qcow2");
        let no_create = disk(&path, "qcow2", Some(1), json!(null));
        let error = prepare(&qemu_img, "gone", &no_create, None)
            .await
            .unwrap_err();
        assert!(format!("{error}").contains("does not exist"), "{error}");
        let from = json!({"from": dir.path().join("no-base.raw"), "backing": true});
        let no_base = disk(&path, "qcow2", None, from);
        let error = prepare(&qemu_img, "gone", &no_base, None)
            .await
            .unwrap_err();
        assert!(format!("{error}").contains("base image"), "{error}");
        assert!(!path.exists());
    }
}
