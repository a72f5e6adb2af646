//! The cloud-init NoCloud seed: the files cloud-init reads (`meta-data`, `user-data`, optionally
//! `network-config`) on a vfat volume labelled `cidata`, attached read-only at boot.
//!
//! Pure: the shell reads the declared contents (text or host files) and hands the bytes here;
//! the image is built in memory with the `fatfs` crate and passed to QEMU as a memfd, so a seed
//! holding secrets (passwords, keys in user-data) never lands in a file on the host.
//!
//! cloud-init runs its per-instance modules (users, SSH keys) again when `instance-id` changes.
//! Without a declared `metaData`, the id is the VM name plus a fingerprint of the user-data and
//! network-config, so a changed seed is a new instance at the next boot, and an unchanged one is not.

use std::io::{Cursor, Write};

use crate::ids;

/// The volume label cloud-init looks for.
const LABEL: [u8; 11] = *b"CIDATA     ";

/// The seed's contents as read at VM start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedContents {
    pub user_data: Option<Vec<u8>>,
    pub meta_data: Option<Vec<u8>>,
    pub network_config: Option<Vec<u8>>,
}

/// The files on the seed, by name. `meta-data` and `user-data` are always there (NoCloud requires
/// both; an empty user-data does nothing).
pub fn seed_files(vm: &str, contents: &SeedContents) -> Vec<(&'static str, Vec<u8>)> {
    let user_data = contents.user_data.clone().unwrap_or_default();
    let meta_data = contents.meta_data.clone().unwrap_or_else(|| {
        let mut seen = user_data.clone();
        seen.push(0);
        seen.extend(contents.network_config.iter().flatten());
        format!(
            "instance-id: {vm}-{}\nlocal-hostname: {vm}\n",
            ids::fingerprint(&seen)
        )
        .into_bytes()
    });
    let mut files = vec![("meta-data", meta_data), ("user-data", user_data)];
    if let Some(network_config) = &contents.network_config {
        files.push(("network-config", network_config.clone()));
    }
    files
}

/// A vfat image labelled `cidata` holding `files` in its root directory.
pub fn fat_image(files: &[(&str, Vec<u8>)]) -> std::io::Result<Vec<u8>> {
    const MIB: usize = 1024 * 1024;
    // Room for the files twice over plus FAT overhead, in whole MiB (at least 2: FAT12 with
    // room to spare).
    let content: usize = files.iter().map(|(_, bytes)| bytes.len()).sum();
    let size = (2 * content + 2 * MIB).div_ceil(MIB) * MIB;
    let mut image = Cursor::new(vec![0u8; size]);
    fatfs::format_volume(
        &mut image,
        fatfs::FormatVolumeOptions::new().volume_label(LABEL),
    )?;
    {
        let fs = fatfs::FileSystem::new(&mut image, fatfs::FsOptions::new())?;
        let root = fs.root_dir();
        for (name, bytes) in files {
            let mut file = root.create_file(name)?;
            file.truncate()?;
            file.write_all(bytes)?;
            file.flush()?;
        }
        drop(root);
        fs.unmount()?;
    }
    Ok(image.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn read_back(image: Vec<u8>) -> (String, Vec<(String, Vec<u8>)>) {
        let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).unwrap();
        let label = fs.volume_label();
        let mut files = Vec::new();
        for entry in fs.root_dir().iter() {
            let entry = entry.unwrap();
            let mut bytes = Vec::new();
            entry.to_file().read_to_end(&mut bytes).unwrap();
            files.push((entry.file_name(), bytes));
        }
        (label, files)
    }

    #[test]
    fn the_image_is_a_cidata_volume_with_the_files() {
        let files = seed_files(
            "web",
            &SeedContents {
                user_data: Some(
                    b"#cloud-config\nssh_authorized_keys: [ssh-ed25519 AAAA]\n".to_vec(),
                ),
                meta_data: None,
                network_config: Some(b"version: 2\n".to_vec()),
            },
        );
        let (label, back) = read_back(fat_image(&files).unwrap());
        assert_eq!(label.trim(), "CIDATA");
        let names: Vec<&str> = back.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["meta-data", "user-data", "network-config"]);
        assert_eq!(back[1].1, files[1].1);
        assert_eq!(back[2].1, b"version: 2\n");
    }

    #[test]
    fn a_large_user_data_fits() {
        let big = vec![b'x'; 3 * 1024 * 1024 + 17];
        let files = vec![("user-data", big.clone())];
        let (_, back) = read_back(fat_image(&files).unwrap());
        assert_eq!(back[0].1, big);
    }

    #[test]
    fn default_meta_data_names_the_vm_and_changes_with_the_seed() {
        let meta = |user_data: &[u8]| {
            let contents = SeedContents {
                user_data: Some(user_data.to_vec()),
                ..SeedContents::default()
            };
            String::from_utf8(seed_files("web", &contents)[0].1.clone()).unwrap()
        };
        assert!(
            meta(b"a").starts_with("instance-id: web-"),
            "{}",
            meta(b"a")
        );
        assert!(meta(b"a").ends_with("local-hostname: web\n"));
        assert_eq!(meta(b"a"), meta(b"a"));
        assert_ne!(meta(b"a"), meta(b"b"));
    }

    #[test]
    fn declared_meta_data_is_kept_and_user_data_always_exists() {
        let files = seed_files(
            "web",
            &SeedContents {
                meta_data: Some(b"instance-id: mine\n".to_vec()),
                ..SeedContents::default()
            },
        );
        assert_eq!(
            files,
            vec![
                ("meta-data", b"instance-id: mine\n".to_vec()),
                ("user-data", Vec::new())
            ]
        );
    }
}
