//! Which names are safe where. VM names become directory names, systemd unit names and QEMU
//! `-name`; disk and NIC ids become parts of QEMU device ids and block node names (`disk-<id>-file`),
//! and QEMU caps node names at 31 bytes.

/// `^[a-z][a-z0-9-]{0,31}$`: a path component, a systemd unit suffix and a QEMU id, unchanged.
pub fn is_valid_vm_name(name: &str) -> bool {
    is_lower_id(name, 32)
}

/// `^[a-z][a-z0-9-]{0,19}$`: `disk-<id>-file` (the longest id derived from it) stays within
/// QEMU's 31-byte node-name limit.
pub fn is_valid_device_id(id: &str) -> bool {
    is_lower_id(id, 20)
}

/// A Linux interface name: 1..=15 bytes of `[A-Za-z0-9_.-]`, not `.` or `..`. Stricter than the
/// kernel (which allows most bytes) so the name is safe inside QEMU's `key=value` options.
pub fn is_valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn is_lower_id(name: &str, max_len: usize) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && name.len() <= max_len
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `xx:xx:xx:xx:xx:xx`, hex digits in either case.
pub(super) fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut octets = [0u8; 6];
    let mut parts = mac.split(':');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *octet = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(octets)
}
