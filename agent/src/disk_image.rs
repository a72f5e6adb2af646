//! What to do with a declared disk's image before QEMU opens it: create it (blank, a copy of a
//! base image, or a qcow2 overlay on one), grow it to the declared size, or refuse (a shrink).
//!
//! Pure: the shell (`qemu::images`) reports what is on disk (`qemu-img info`), this decides, and
//! the shell runs the `qemu-img` commands returned here. An image is always made under a
//! temporary name and then linked into place, which fails if the path exists: an existing file
//! is never overwritten, even by a racing writer.

use std::path::Path;

use crate::devices::MIB;
use crate::spec::{DiskFormat, DiskSpec};

/// An image file as `qemu-img info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: DiskFormat,
    pub virtual_size: u64,
}

/// What an existing image needs before it is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Ready,
    /// Grow to this many bytes (the declared size is larger than the image).
    Grow(u64),
}

/// Checks an existing image against the declared size. A smaller declaration is an error: the
/// image is never shrunk.
pub fn check_existing(id: &str, disk: &DiskSpec, virtual_size: u64) -> Result<Existing, String> {
    let Some(size_mib) = disk.size_mib else {
        return Ok(Existing::Ready);
    };
    let declared = size_mib * MIB;
    if declared > virtual_size {
        Ok(Existing::Grow(declared))
    } else if declared < virtual_size {
        Err(format!(
            "disks.{id}: {} is {} MiB but sizeMiB declares {size_mib}: shrinking destroys data, \
             so it is refused (declare sizeMiB >= {0}, or shrink the image by hand)",
            disk.path.display(),
            virtual_size.div_ceil(MIB)
        ))
    } else {
        Ok(Existing::Ready)
    }
}

/// The `qemu-img` commands (arguments after `qemu-img`) that make `disk`'s image at `tmp`, which
/// the shell then links to `disk.path`. `base` is what `qemu-img info` says about
/// `disk.create.from` (None without `from`).
pub fn create_commands(
    id: &str,
    disk: &DiskSpec,
    base: Option<&ImageInfo>,
    tmp: &Path,
) -> Result<Vec<Vec<String>>, String> {
    let create = disk
        .create
        .as_ref()
        .ok_or_else(|| format!("disks.{id}: {} does not exist", disk.path.display()))?;
    let format = format_name(disk.format);
    let tmp = tmp.display().to_string();
    let size = disk.size_mib.map(|mib| mib * MIB);
    let (Some(from), Some(base)) = (&create.from, base) else {
        let size = size.ok_or_else(|| format!("disks.{id}: a blank image needs sizeMiB"))?;
        return Ok(vec![args(&[
            "create",
            "-q",
            "-f",
            format,
            &tmp,
            &size.to_string(),
        ])]);
    };
    if let Some(size) = size.filter(|&size| size < base.virtual_size) {
        return Err(format!(
            "disks.{id}: sizeMiB {} is below the {} MiB of its base image {}: it would cut the \
             base image off",
            size / MIB,
            base.virtual_size.div_ceil(MIB),
            from.display()
        ));
    }
    let from = from.display().to_string();
    let base_format = format_name(base.format);
    if create.backing {
        let mut create = args(&[
            "create",
            "-q",
            "-f",
            format,
            "-b",
            &from,
            "-F",
            base_format,
            &tmp,
        ]);
        create.extend(size.map(|size| size.to_string()));
        return Ok(vec![create]);
    }
    let mut commands = vec![args(&[
        "convert",
        "-q",
        "-f",
        base_format,
        "-O",
        format,
        &from,
        &tmp,
    ])];
    if let Some(size) = size.filter(|&size| size > base.virtual_size) {
        commands.push(resize_command(disk.format, Path::new(&tmp), size));
    }
    Ok(commands)
}

/// `qemu-img resize` of an image that no QEMU has open.
pub fn resize_command(format: DiskFormat, path: &Path, size: u64) -> Vec<String> {
    args(&[
        "resize",
        "-q",
        "-f",
        format_name(format),
        &path.display().to_string(),
        &size.to_string(),
    ])
}

pub fn format_name(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    }
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskCache, DiskCreate};

    fn disk(format: DiskFormat, size_mib: Option<u64>, create: Option<DiskCreate>) -> DiskSpec {
        DiskSpec {
            path: "/var/lib/vms/data.img".into(),
            format,
            read_only: false,
            cache: DiskCache::Writeback,
            serial: None,
            size_mib,
            create,
            delete_on_remove: false,
            shared: false,
        }
    }

    fn from(base: &str, backing: bool) -> Option<DiskCreate> {
        Some(DiskCreate {
            from: Some(base.into()),
            backing,
        })
    }

    const TMP: &str = "/var/lib/vms/.data.img.plasmavmc-new";
    const BASE: ImageInfo = ImageInfo {
        format: DiskFormat::Raw,
        virtual_size: 512 * MIB,
    };

    #[test]
    fn a_blank_image_has_the_declared_format_and_size() {
        let d = disk(DiskFormat::Qcow2, Some(10240), Some(DiskCreate::default()));
        assert_eq!(
            create_commands("data", &d, None, Path::new(TMP)).unwrap(),
            vec![args(&["create", "-q", "-f", "qcow2", TMP, "10737418240"])]
        );
        let no_size = disk(DiskFormat::Raw, None, Some(DiskCreate::default()));
        let error = create_commands("data", &no_size, None, Path::new(TMP)).unwrap_err();
        assert!(error.contains("needs sizeMiB"), "{error}");
    }

    #[test]
    fn a_backed_image_is_an_overlay_naming_the_base_and_its_format() {
        let d = disk(
            DiskFormat::Qcow2,
            None,
            from("/nix/store/x-image/nixos.img", true),
        );
        assert_eq!(
            create_commands("root", &d, Some(&BASE), Path::new(TMP)).unwrap(),
            vec![args(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "/nix/store/x-image/nixos.img",
                "-F",
                "raw",
                TMP
            ])]
        );
        let bigger = disk(DiskFormat::Qcow2, Some(1024), from("/base", true));
        let commands = create_commands("root", &bigger, Some(&BASE), Path::new(TMP)).unwrap();
        assert_eq!(commands[0].last().unwrap(), &(1024 * MIB).to_string());
    }

    #[test]
    fn a_copy_is_converted_then_grown_to_the_declared_size() {
        let d = disk(DiskFormat::Qcow2, Some(2048), from("/base.raw", false));
        assert_eq!(
            create_commands("root", &d, Some(&BASE), Path::new(TMP)).unwrap(),
            vec![
                args(&[
                    "convert",
                    "-q",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "/base.raw",
                    TMP
                ]),
                args(&[
                    "resize",
                    "-q",
                    "-f",
                    "qcow2",
                    TMP,
                    &(2048 * MIB).to_string()
                ]),
            ]
        );
        let same = disk(DiskFormat::Raw, Some(512), from("/base.raw", false));
        assert_eq!(
            create_commands("root", &same, Some(&BASE), Path::new(TMP))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_size_below_the_base_is_refused() {
        let d = disk(DiskFormat::Qcow2, Some(100), from("/base.raw", true));
        let error = create_commands("root", &d, Some(&BASE), Path::new(TMP)).unwrap_err();
        assert!(
            error.contains("below the 512 MiB of its base image"),
            "{error}"
        );
    }

    #[test]
    fn an_existing_image_grows_but_never_shrinks() {
        let d = disk(DiskFormat::Raw, Some(1024), None);
        assert_eq!(check_existing("data", &d, 1024 * MIB), Ok(Existing::Ready));
        assert_eq!(
            check_existing("data", &d, 512 * MIB),
            Ok(Existing::Grow(1024 * MIB))
        );
        let error = check_existing("data", &d, 2048 * MIB).unwrap_err();
        assert!(
            error.starts_with(
                "disks.data: /var/lib/vms/data.img is 2048 MiB but sizeMiB declares 1024"
            ),
            "{error}"
        );
        let no_size = disk(DiskFormat::Raw, None, None);
        assert_eq!(check_existing("data", &no_size, 7), Ok(Existing::Ready));
    }

    #[test]
    fn a_missing_image_without_create_is_an_error() {
        let d = disk(DiskFormat::Raw, Some(1), None);
        let error = create_commands("data", &d, None, Path::new(TMP)).unwrap_err();
        assert_eq!(error, "disks.data: /var/lib/vms/data.img does not exist");
    }
}
